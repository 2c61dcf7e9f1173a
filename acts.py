"""The activation folder: what harvest.py writes and train.py, evaluate.py and export.py read.

    import acts
    manifest, shards = acts.open_split("runs/acts", "heldout")   # [(acts [rows, d_in], tokens), ...]
    for x_BD in acts.batches(shards, 4096, seed=0): ...           # the shuffled training stream

Layout (row r of a shard is window r // (context-1), position 1 + r % (context-1); a window
starts with BOS where the model's tokenizer adds one, and a document's windows are all in one split):
    manifest.json                  model, layer, site, d_in, dtype, context, splits and shards
    train/acts_00000.npy           [rows, d_in] float16 or float32
    train/tokens_00000.npy         [windows, context] int32, the token ids of those windows
    heldout/...                    the same for the held-out windows
The manifest records a sha256 for each shard and for itself. Every file goes through a temporary
name and an atomic rename, and the manifest lists a shard only once it is complete, so a killed
harvest leaves a consistent folder. A harvest by N processes (torchrun) keeps one manifest per
process, manifest.rank01.json..., with shards acts_r01_00000.npy..., and `merge_ranks` writes
manifest.json from them once all are complete.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import cli
from sae_folder import atomic_write

SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
# The argparse type of --acts: a folder that holds a manifest (its shards are checked when opened).
folder = cli.check(str, lambda t: t and os.path.isfile(os.path.join(t, MANIFEST)), "a folder written by harvest.py")


# --- Files written atomically, with their checksums ----------------------------------------


def write_json(path, obj):
    """Write JSON through a temporary file and an atomic rename."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


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


# --- The manifest ----------------------------------------------------------------------------


def new_manifest(settings, hook, d_in, rank=0, world=1):
    """The manifest of an empty folder harvested with `settings` (model, gguf_file, layer, site,
    context, dtype, heldout_every, source; bos and separator, the token ids that start each window
    and end each document) at module `hook`, d_in wide."""
    s = settings
    manifest = {"format": 2, "model": s["model"], "gguf_file": s["gguf_file"], "layer": s["layer"], "site": s["site"],
                "hook": hook, "d_in": int(d_in), "dtype": s["dtype"], "context": s["context"], "text": s["source"],
                "bos": s.get("bos"), "separator": s.get("separator"),
                "split": f"by document: every {s['heldout_every']}th document of the text is held out, and a "
                         "document whose text the other split already has is dropped",
                "settings": settings, "complete": False, "rows_per_window": s["context"] - 1, "tokens": 0,
                "splits": {split: {"rows": 0, "windows": 0, "shards": []} for split in SPLITS}}
    if world > 1:
        manifest.update(rank=rank, world_size=world)
    return manifest


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


# --- Shards ----------------------------------------------------------------------------------


def append_shard(folder, manifest, split, acts_ND, tokens_WT, name=MANIFEST):
    """Write one shard of `split` (activations and their token windows) and list it in the manifest,
    which is rewritten: the shard counts only from then on. Shard files are numbered per split, with
    the process's rank in them under torchrun (acts_00000.npy, or acts_r01_00000.npy)."""
    entry = manifest["splits"][split]
    prefix = f"r{manifest['rank']:02d}_" if "rank" in manifest else ""
    i = len(entry["shards"])
    acts_file, tokens_file = f"{split}/acts_{prefix}{i:05d}.npy", f"{split}/tokens_{prefix}{i:05d}.npy"
    acts_sha256 = save_npy(Path(folder) / acts_file, acts_ND)
    tokens_sha256 = save_npy(Path(folder) / tokens_file, tokens_WT)
    entry["shards"].append({"acts": acts_file, "tokens": tokens_file, "rows": len(acts_ND), "windows": len(tokens_WT),
                            "acts_sha256": acts_sha256, "tokens_sha256": tokens_sha256})
    entry["rows"] += len(acts_ND)
    entry["windows"] += len(tokens_WT)
    manifest["tokens"] = sum(manifest["splits"][s]["rows"] for s in SPLITS)
    write_manifest(folder, manifest, name)


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
    """(manifest, shards) of a split: the folder's manifest, and a list with one (activations
    [rows, d_in], token windows [windows, context]) pair per shard, both read-only memory maps in the
    dtypes on disk (activations float16 by default; sae.encode takes them as they are). Row r of a
    shard is position 1 + r % (context - 1) of its window r // (context - 1). With `verify`, each
    shard's sha256 is checked against the manifest (about a second per GB)."""
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


def folder_worlds(folder):
    """The numbers of processes that wrote the manifests in `folder` (empty if it holds none)."""
    worlds = {read_manifest(folder).get("world_size", 1)} if (Path(folder) / MANIFEST).is_file() else set()
    return worlds | {read_manifest(folder, p.name).get("world_size") for p in Path(folder).glob("manifest.rank*.json")}


def merge_ranks(folder, world):
    """Write manifest.json from the `world` processes' manifests once all are complete (else None).
    It lists rank 0's shards, then rank 1's...: the row order differs from a single-process harvest,
    but each split holds the same set of windows, and the same rows for each window."""
    names = [rank_manifest(r, world) for r in range(world)]
    if not all((Path(folder) / name).is_file() for name in names):
        return None
    parts = [read_manifest(folder, name) for name in names]
    if not all(p["complete"] for p in parts):
        return None
    if any(p["settings"] != parts[0]["settings"] or p.get("world_size") != world for p in parts):
        raise ValueError(f"the processes' manifests in {folder} disagree on their settings; harvest into a new --out.")
    merged = {k: v for k, v in parts[0].items() if k not in ("rank", "sha256")}
    merged["splits"] = {s: {"rows": sum(p["splits"][s]["rows"] for p in parts),
                            "windows": sum(p["splits"][s]["windows"] for p in parts),
                            "shards": [shard for p in parts for shard in p["splits"][s]["shards"]]} for s in SPLITS}
    merged["tokens"] = sum(p["tokens"] for p in parts)
    merged["text_exhausted"] = any(p["text_exhausted"] for p in parts)
    if merged["splits"]["train"]["rows"] == 0:
        raise ValueError("the text gave no complete training window; pass more text or a smaller --context.")
    write_manifest(folder, merged)
    return merged


# --- The shuffled training stream --------------------------------------------------------------

BLOCK = 1024  # rows read together from one shard; blocks, not rows, are shuffled across shards
BUFFER_ROWS = 2**18  # rows of a shuffle buffer, by default


def stream_plan(shard_rows, batch_size, seed, buffer_rows=BUFFER_ROWS):
    """Yield, forever, the (shard, start) blocks of each shuffle buffer and the row order inside it.

    Each epoch permutes all blocks of all shards (numpy Generator seeded by (seed, epoch)); a buffer
    of `buffer_rows` rows gathers consecutive blocks of that order and is permuted again. Only
    indices are computed here, so a resumed run skips ahead without reading any data.
    """
    blocks = [(s, i) for s, n in enumerate(shard_rows) for i in range(0, n, BLOCK)]
    per_buffer = max(1, buffer_rows // BLOCK)
    epoch, yielded = 0, False
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(blocks))
        for k in range(0, len(order), per_buffer):
            group = [blocks[j] for j in order[k:k + per_buffer]]
            rows = sum(min(BLOCK, shard_rows[s] - i) for s, i in group)
            if rows >= batch_size:
                yielded = True
                yield group, rng.permutation(rows)[: rows - rows % batch_size]
        if not yielded:          # else a generator that never yields: a hang (found: a batch above the split's rows)
            raise ValueError(f"no shuffle buffer of {buffer_rows:,} rows ({sum(shard_rows):,} in the shards) "
                             f"holds a batch of {batch_size:,}; lower the batch size or raise buffer_rows")
        epoch += 1


def batches(shards, batch_size, seed, start_step=0, buffer_rows=BUFFER_ROWS, rank=0, world=1):
    """Float32 training batches [batch_size, d_in] from memory-mapped shards, from `start_step` on.

    With `world` > 1 (torchrun), every rank plans the same global batches and yields only its
    slice, rows [rank B/world, (rank + 1) B/world) of each: the slices of ranks 0, 1, ...
    concatenated are the one-process batch. Only the rows yielded are read from disk.
    """
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} cannot be split evenly over {world} ranks; pass a multiple of {world}.")
    B_rank = batch_size // world
    plan = stream_plan([len(a) for a, _ in shards], batch_size, seed, buffer_rows)
    step = 0
    for group, order in plan:
        n = len(order) // batch_size
        if step + n <= start_step:                  # a whole buffer before the resume point
            step += n
            continue
        # The buffer's rows as (shard, row) pairs, in the order of its blocks; order permutes them.
        spans = [(s, i, min(i + BLOCK, len(shards[s][0]))) for s, i in group]
        shard_R = np.concatenate([np.full(end - i, s) for s, i, end in spans])
        row_R = np.concatenate([np.arange(i, end) for s, i, end in spans])
        for b in range(n):
            if step >= start_step:
                picks = order[b * batch_size + rank * B_rank:b * batch_size + (rank + 1) * B_rank]
                yield read_rows(shards, shard_R[picks], row_R[picks], step)
            step += 1


def read_rows(shards, shard_N, row_N, step):
    """Float32 [N, d_in]: row row_N[j] of shard shard_N[j], read shard by shard in ascending row
    order. A one-sentence ValueError names the shard and rows if any of them is NaN or Inf."""
    x_ND = np.empty((len(row_N), shards[0][0].shape[1]), np.float32)
    for s in np.unique(shard_N):
        where = np.flatnonzero(shard_N == s)
        where = where[np.argsort(row_N[where], kind="stable")]
        rows = shards[s][0][row_N[where]]
        bad = ~np.isfinite(rows).all(1)
        if bad.any():
            name = getattr(shards[s][0], "filename", None) or f"shard {s}"
            first, last = row_N[where][bad][[0, -1]]
            raise ValueError(f"{name} holds NaN or Inf activations in rows {first} to {last}, met at step {step}")
        x_ND[where] = rows
    return torch.from_numpy(x_ND)


def sample_rows(shards, n, seed=0):
    """n rows drawn uniformly (without replacement) from all shards, as float32."""
    sizes = np.array([len(a) for a, _ in shards])
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(sizes.sum(), size=min(n, sizes.sum()), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = [shards[s][0][np.sort(picks[(picks >= starts[s]) & (picks < starts[s + 1])] - starts[s])]
           for s in range(len(shards))]
    return torch.from_numpy(np.concatenate(out).astype(np.float32))
