"""The SAE folder: config.json and sae.safetensors, for every architecture (docs/maths.md section 7).

    import sae_folder
    sae_folder.save(sae, "runs/my_sae")          # any of our SAEs; fold the input scale in first
    sae = sae_folder.load("runs/my_sae")         # the class config.json's "architecture" names

sae.safetensors holds the weights in float32 under Gemma Scope's names (W_enc, b_enc, W_dec, b_dec,
threshold; a baseline's own biases under their names); config.json holds the architecture, the
shapes, the settings that shape the computation (bandwidth, pre_encoder_bias, k), provenance, and
a sha256 over both files that `load` checks. Reading runs no code from the folder. Both files are
written to temporary names and renamed (`atomic_write`, which every file this project writes goes
through), so a crash or a full disk leaves the old folder as it was. Each way a folder can be wrong
ends in one sentence that says what to do. formats.py reads other layouts (Gemma Scope, SAELens).
"""

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from baselines import ARCHITECTURES, make_sae

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"
# The config.json entries that shape an architecture's computation, where it has them.
OWN_SETTINGS = ("k", "bandwidth", "pre_encoder_bias")


def save(sae, folder):
    """Write `sae` to `folder` as config.json and sae.safetensors, atomically. The weights are
    written as they are: fold the training input scale in first (`fold_input_scale_`) so that
    they take raw activations."""
    return write_folder(folder, config_of(sae), tensors_of(sae))


def config_of(sae):
    own = {key: getattr(sae, key) for key in OWN_SETTINGS if hasattr(sae, key)}
    return {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, **own, "dtype": "float32",
            **sae.metadata}


def tensors_of(sae):
    """The SAE's weights under their file names: its state dict, JumpReLU's log_threshold saved as
    theta itself (Gemma Scope's `threshold`)."""
    tensors = dict(sae.state_dict())
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    return tensors


def load(folder, device=None):
    """Rebuild the SAE a folder written by `save` holds, on `device`; one-sentence ValueError if it cannot."""
    cfg, tensors = read_folder(folder)
    arch, d_in, d_sae = cfg["architecture"], cfg["d_in"], cfg["d_sae"]
    if arch in ("topk", "batchtopk") and "k" not in cfg:
        raise ValueError(f"{folder}/{CONFIG_NAME} has no valid 'k' (a whole number from 1 to d_sae); it is damaged.")
    own = {key: cfg[key] for key in ("bandwidth", "pre_encoder_bias") if key in cfg and arch == "jumprelu"}
    # On the meta device: nothing is allocated before the file's shapes are checked against config.json.
    sae = make_sae(arch, d_in, d_sae, k=cfg.get("k"), device="meta", **own)
    check_shapes(folder, tensors, {name: tuple(t.shape) for name, t in tensors_of(sae).items()})
    for name, t in tensors.items():
        if arch == "jumprelu" and name == "threshold":
            check_thresholds(f"{folder}/{WEIGHTS_NAME}", t)
        elif not t.isfinite().all():
            raise ValueError(f"{folder}/{WEIGHTS_NAME} holds NaN or Inf weights; the SAE diverged or the file "
                             "is damaged.")
    if arch == "jumprelu":
        # on the SAE's own device: CUDA's exp can differ from the CPU's in the last bit
        tensors["log_threshold"] = exact_log(tensors.pop("threshold").to(device or "cpu"))
    sae = assemble(sae, {name: tensors[name] for name in sae.state_dict()}, device)
    sae.metadata = metadata_of(cfg, config_of(sae))
    return sae


def assemble(sae, tensors, device):
    """Give `sae`, built on the meta device (no memory, no initialisation), these tensors, as
    float32 on `device`. `tensors` must name every parameter and buffer of its state dict."""
    assert set(tensors) == set(sae.state_dict()), (sorted(tensors), sorted(sae.state_dict()))
    sae = sae.to_empty(device=device or "cpu")
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t.float())
    return sae


def exact_log(threshold_F):
    """float32 log(theta) whose exp() on the same device gives theta back exactly: save/load is exact.

    A log computed in float64 and rounded misses by one float32 step for about 1 in 10^4
    thresholds; a few nudges to the neighbouring floats find the exact one where it exists.
    theta = 0 gives -inf, and exp(-inf) = 0.
    """
    threshold_F = threshold_F.float()
    log_F = threshold_F.double().log().float()
    for toward in (math.inf, -math.inf):
        candidate_F = log_F
        for _ in range(4):
            candidate_F = torch.nextafter(candidate_F, torch.full_like(candidate_F, toward))
            fix = (log_F.exp() != threshold_F) & (candidate_F.exp() == threshold_F)
            log_F = torch.where(fix, candidate_F, log_F)
    return log_F


def check_thresholds(where, threshold_F):
    """A threshold is 0 or more: theta = 0 (log_threshold = -inf, exactly 0 again through exp) is a
    latent that fires on any positive pre-activation, as SAELens 6.48 and later trains them, where
    the threshold is projected onto theta >= 0. Our own training keeps theta > 0."""
    bad = int((~(threshold_F >= 0)).sum())
    if bad:
        raise ValueError(f"{where} has {bad} threshold{'s' * (bad != 1)} below 0 or NaN, which no JumpReLU SAE holds; "
                         "the file is damaged or not a JumpReLU SAE.")


def metadata_of(cfg, own):
    """A folder's provenance: the config.json entries that are not the SAE's own settings."""
    return {k: v for k, v in cfg.items() if k not in own}


def _write_tmp(path, write):
    """write(file) into `path`.tmp and flush it to disk; the temporary file is removed if that fails."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, write):
    """Call write(file) on a temporary file next to `path`, flush it to disk, then rename it over
    `path`: a reader sees the old file or the new one, never half of one. If writing fails (a full
    disk, an exception) the temporary file is removed and `path` is untouched."""
    os.replace(_write_tmp(path, write), path)
    return Path(path)


def folder_digest(weights, config):
    """sha256 over the weights file's bytes and config.json's other entries (canonical JSON)."""
    body = json.dumps({k: v for k, v in config.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(weights + body.encode()).hexdigest()


def write_folder(folder, config, tensors):
    """Write `sae.safetensors` (tensors as float32) and `config.json` to `folder`. Both are written
    to temporary files first, then renamed: a full disk leaves the old folder as it was. config.json
    records a sha256 over both (`folder_digest`), which `read_folder` checks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    data = save_safetensors(tensors, metadata={"architecture": config["architecture"]})
    config = {**config, "sha256": folder_digest(data, config)}
    tmp_weights = _write_tmp(folder / WEIGHTS_NAME, lambda f: f.write(data))
    try:
        tmp_config = _write_tmp(folder / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        raise
    os.replace(tmp_weights, folder / WEIGHTS_NAME)
    os.replace(tmp_config, folder / CONFIG_NAME)
    return folder


def read_config(folder):
    """config.json of an SAE folder, as a dict, with one-sentence errors for a missing or damaged one."""
    check_files(folder, (CONFIG_NAME, WEIGHTS_NAME), "an SAE folder written by this project")
    return read_json_object(Path(folder) / CONFIG_NAME, "re-save or restore the folder")


def check_files(folder, names, kind):
    """One-sentence errors unless `folder` is a folder that holds the files `names` (a `kind`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the folder that holds {' and '.join(names)}.")
    for name in names:
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name}; it is not {kind}.")


def read_json_object(path, remedy):
    """The JSON object in the file at `path`; a one-sentence ValueError, ending in `remedy`, when it
    is not valid JSON or holds something else."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {remedy}.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(obj).__name__}; {remedy}.")
    return obj


def read_folder(folder):
    """Read an SAE folder's config.json and float32 tensors, checking each entry a reader relies on."""
    folder = Path(folder)
    cfg = read_config(folder)
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"{folder}/{CONFIG_NAME} names architecture {arch!r}, which is none of "
                         f"{', '.join(ARCHITECTURES)}.")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise ValueError(f"{folder}/{CONFIG_NAME} has no valid {key!r} (a positive integer); it is damaged.")
    # The entries that shape the computation, when present, must have their types.
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    checks = {"bandwidth": number, "pre_encoder_bias": lambda v: isinstance(v, bool),
              "k": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= cfg["d_sae"]}
    for key, ok in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise ValueError(f"{folder}/{CONFIG_NAME} has an invalid {key!r} ({cfg[key]!r}); it is damaged.")
    data = (folder / WEIGHTS_NAME).read_bytes()
    digest = cfg.pop("sha256", None)           # absent in folders written by other tools
    if digest is not None and folder_digest(data, cfg) != digest:
        raise ValueError(f"{folder} does not match the sha256 in its {CONFIG_NAME} (a file was damaged or edited); "
                         "restore it, or delete the sha256 entry to load it as it is.")
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{folder}/{WEIGHTS_NAME} cannot be read as safetensors ({str(e)[:80]}); "
                         "it is truncated or damaged.") from None
    wrong = [name for name, t in tensors.items() if t.dtype != torch.float32]
    if wrong:
        raise ValueError(f"{folder}/{WEIGHTS_NAME} holds {wrong[0]} as {tensors[wrong[0]].dtype}, not float32; it is damaged.")
    return cfg, tensors


def check_shapes(folder, tensors, expected):
    """One-sentence errors for missing tensors or shapes that disagree with config.json."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{folder}/{WEIGHTS_NAME} has no tensor {name!r}; the file is incomplete.")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{folder}/{WEIGHTS_NAME} holds {name} of shape {list(tensors[name].shape)}, "
                             f"but config.json implies {list(shape)}; the folder is inconsistent.")
