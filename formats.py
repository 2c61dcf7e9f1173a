"""Read the SAEs researchers already have (Gemma Scope, SAELens) and write ours in SAELens's layout.

    python formats.py gemma-scope/layer_12/width_16k/average_l0_82 --out runs/gs_l12   # -> our folder
    python formats.py runs/sae_l0_32 --out runs/sae_l0_32_saelens --saelens            # -> SAELens folder

    import sae_folder
    from formats import load_sae, save_saelens
    sae = load_sae("path")                  # our folder, Gemma Scope's params.npz or 2's folder, or SAELens's
    sae_folder.save(sae, "runs/imported")   # then evaluate.py and export.py as for our own SAEs
    save_saelens(sae, "for_saelens")        # sae_lens.SAE.load_from_disk("for_saelens") reads it

Every loader gives the features of the source's own forward pass (docs/maths.md section 1), written out
in its docstring. Where the source computes something our classes do not (a pre-encoder bias
on a ReLU SAE, SAELens's decoder-norm rescaling in TopK), the difference is folded into the
weights exactly in real arithmetic, computed in float64 and rounded once to float32, so
features agree to float32 rounding. What cannot be folded (per-input normalisation, a scale
the folder does not hold) is refused with a one-sentence error. Weights are
float32: float16 and bfloat16 files widen exactly, float64 files are rounded.
"""

import json
import math
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import baselines
import cli
import harvest
import sae_folder
from jumprelu import JumpReLUSAE
from sae_folder import CONFIG_NAME, WEIGHTS_NAME, assemble, atomic_write, exact_log

GEMMA_SCOPE_FILE = "params.npz"
GEMMA_SCOPE_FILES = (GEMMA_SCOPE_FILE, "params.safetensors")     # Gemma Scope's, Gemma Scope 2's
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# SAELens reads a cfg.json whose sae_lens_version is 6.0.0 or later in the layout written here
# (sae_lens/loading/pretrained_sae_loaders.py, handle_config_defaulting); older ones get renamed keys.
SAELENS_FORMAT_VERSION = "6.0.0"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Our config.json entries that SAELens metadata must not overwrite when it becomes our metadata.
RESERVED = {"architecture", "d_in", "d_sae", "k", "bandwidth", "pre_encoder_bias", "dtype", "sha256"}
# SAELens metadata entries that describe its own format, not the SAE's provenance.
SAELENS_FORMAT_KEYS = {"model_name", "hook_name", "hook_module", "sae_lens_version", "sae_lens_training_version",
                       "training_architecture", "training_architecture_details"}


# --- Building an SAE from tensors ----------------------------------------------------------


def _jumprelu_sae(W_enc, b_enc, W_dec, b_dec, *, threshold=None, log_threshold=None, pre_encoder_bias,
                  bandwidth=0.001, device=None):
    """A JumpReLUSAE with these weights; theta from `threshold` (through exact_log, exact) or
    from `log_threshold` as it is."""
    d_in, d_sae = W_enc.shape
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=bandwidth, pre_encoder_bias=pre_encoder_bias, device="meta")
    log_F = log_threshold.float() if log_threshold is not None else exact_log(threshold.to(device or "cpu"))
    return assemble(sae, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                           "log_threshold": log_F}, device)


def relu_gate_threshold(threshold_F):
    """Gemma Scope and SAELens compute f = ReLU(pre) * (pre > theta). For theta >= 0 that is our
    pre * H(pre - theta); for theta < 0 it is ReLU(pre), ours with theta = 0. So a threshold below 0
    becomes 0, exactly, and 0 is log_threshold -inf. SAELens trains theta itself and projects it onto
    >= 0 before each forward pass, so a latent that reached 0 ends at 0 or, after the last step's
    update, just below it (sae-lens 6.54.12 left 17 of 64 below 0 in fixtures/saelens/jumprelu)."""
    return threshold_F.clamp_min(0)


# --- Gemma Scope ---------------------------------------------------------------------------


def load_gemma_scope(path, device=None):
    """A JumpReLUSAE from Gemma Scope's `params.npz`, Gemma Scope 2's `params.safetensors`, or the
    folder that holds either.

    Gemma Scope's own definition of the forward pass (its tutorial, raw activations in), which
    Gemma Scope 2 keeps (SAELens reads its folders as "jumprelu" without apply_b_dec_to_input):
        pre = x @ W_enc + b_enc;  f = (pre > threshold) * ReLU(pre);  x_hat = f @ W_dec + b_dec
    That is our JumpReLUSAE without the pre-encoder bias, with thresholds below 0 read as 0
    (relu_gate_threshold). Arrays: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
    b_dec [d_in], threshold [d_sae]; Gemma Scope 2 names the weights w_enc and w_dec (so may
    the first, as SAELens accepts). A Gemma Scope 2 folder is named like resid_post/layer_12_width_16k_l0_small
    and may hold a config.json (model_name, hf_hook_point_in): the metadata takes the model, and
    the layer and site where the folder is a residual stream (resid_post) or MLP output (mlp_out).
    Transcoders (a decoder to another site, an affine skip) are refused. The thresholds become
    log_threshold through exact_log: exact where exp of a float32 reaches them, else a few
    float32 steps away (about 92% exact for thresholds in [0.01, 3], at most 4 steps off), so a
    latent can decide differently only within those steps of its threshold.
    """
    path = Path(path)
    file = next((path / f for f in GEMMA_SCOPE_FILES if (path / f).is_file()), None) if path.is_dir() else path
    if file is None or not file.is_file():
        raise ValueError(f"{path} has no {' or '.join(GEMMA_SCOPE_FILES)}; pass a Gemma Scope params.npz, a Gemma Scope 2 "
                         "params.safetensors, or the folder that holds one.")
    arrays = {re.sub(r"^w_", "W_", key): a for key, a in _gemma_scope_arrays(file).items()}
    if "affine_skip_connection" in arrays:
        raise ValueError(f"{file} is a transcoder (it has an affine skip connection), not an SAE; pass an SAE's params.")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        if name not in arrays:
            raise ValueError(f"{file} has no array {name!r}; a Gemma Scope params file holds W_enc, W_dec, b_enc, "
                             "b_dec and threshold.")
        if arrays[name].dtype.kind != "f":
            raise ValueError(f"{file} holds {name} as {arrays[name].dtype}, not floating point; it is not a "
                             "Gemma Scope SAE.")
    if arrays["W_enc"].ndim != 2:
        raise ValueError(f"{file} holds W_enc of shape {list(arrays['W_enc'].shape)}, not [d_in, d_sae].")
    d_in, d_sae = arrays["W_enc"].shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{file} holds {name} of shape {list(arrays[name].shape)}, but W_enc "
                             f"[{d_in}, {d_sae}] implies {list(shape)}; the arrays do not belong together.")
    tensors = {name: torch.from_numpy(np.asarray(arrays[name])).float() for name in ("W_enc", *expected)}
    for name, t in tensors.items():
        if not bool(t.isfinite().all()):
            raise ValueError(f"{file} holds NaN or Inf in {name}; the file is damaged.")
    sae = _jumprelu_sae(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                        threshold=relu_gate_threshold(tensors["threshold"]), pre_encoder_bias=False, device=device)
    sae.metadata = {"source": "gemma-scope" if file.suffix == ".npz" else "gemma-scope-2", "source_path": str(file),
                    **_gemma_scope_2_site(file.parent)}
    return sae


def _gemma_scope_arrays(file):
    """The named arrays of a params.npz or params.safetensors, as NumPy; a one-sentence ValueError
    for a file that cannot be read."""
    kind = "a safetensors file" if file.suffix == ".safetensors" else "a .npz archive"
    try:
        if file.suffix == ".safetensors":
            return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()      # NumPy has no bfloat16
                    for k, v in load_safetensors(file.read_bytes()).items()}
        npz = np.load(file, allow_pickle=False)
        if isinstance(npz, np.lib.npyio.NpzFile):
            with npz:
                return {key: npz[key] for key in npz.files}
    except Exception as e:            # numpy's, zipfile's and safetensors' errors alike
        raise ValueError(f"{file} cannot be read as {kind} ({str(e)[:80]}); it is truncated or damaged.") from None
    raise ValueError(f"{file} holds a single array, not the arrays of an SAE; pass Gemma Scope's params.npz.")


def _gemma_scope_2_site(folder):
    """Our metadata from a Gemma Scope 2 folder: "model" from its config.json, "layer" and "site" from
    its name (resid_post/layer_12_width_16k_l0_small: layer 12, resid); {} where it says neither."""
    md, config = {}, folder / "config.json"
    if config.is_file():
        cfg = sae_folder.read_json_object(config, "restore the Gemma Scope 2 folder's config.json")
        if isinstance(cfg.get("model_name"), str):
            md["model"] = cfg["model_name"] if "/" in cfg["model_name"] else "google/" + cfg["model_name"]
    layer = re.search(r"layer_(\d+)", folder.name)
    site = {"resid_post": "resid", "mlp_out": "mlp"}.get(folder.parent.name)
    if layer and site:
        md.update(layer=int(layer.group(1)), site=site)
    return md


# --- SAELens -------------------------------------------------------------------------------


def _saelens_major(cfg):
    """SAELens's major version from cfg.json (top level or metadata), 0 when absent or unreadable."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    match = re.match(r"\s*(\d+)\.", str(version or ""))
    return int(match.group(1)) if match else 0


def _read_saelens_config(folder):
    """cfg.json in SAELens 6's layout, with the renames SAELens applies to older configs
    (handle_pre_6_0_config): hook_point -> hook_name, activation_fn_str -> activation_fn, a topk
    activation -> the topk architecture, a bool normalize_activations -> "none" or
    "expected_average_only_in", missing architecture -> "standard", missing
    apply_b_dec_to_input -> True. Returns (cfg, metadata)."""
    cfg = sae_folder.read_json_object(folder / SAELENS_CONFIG, "restore the file")
    if _saelens_major(cfg) >= 6:
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        return cfg, meta
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    cfg = {renames.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg, {k: cfg[k] for k in ("model_name", "hook_name") if k in cfg}


def _saelens_tensors(folder, dtype):
    """The weights, rounded to the cfg dtype as SAELens does on load, then widened to float32
    (rounded for float64)."""
    try:
        tensors = load_safetensors((folder / SAELENS_WEIGHTS).read_bytes())
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{folder}/{SAELENS_WEIGHTS} cannot be read as safetensors ({str(e)[:80]}); "
                         "it is truncated or damaged.") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{folder}/{SAELENS_WEIGHTS} holds {name} as {t.dtype}, not floating point; it is damaged.")
        if not bool(t.isfinite().all()):
            raise ValueError(f"{folder}/{SAELENS_WEIGHTS} holds NaN or Inf in {name}; the SAE diverged or the "
                             "file is damaged.")
    return {name: t.to(dtype).float() for name, t in tensors.items()}


def _take(folder, tensors, names, shapes):
    """Pop `names` from `tensors`, checking that each is there with its shape."""
    out = {}
    for name in names:
        if name not in tensors:
            raise ValueError(f"{folder}/{SAELENS_WEIGHTS} has no tensor {name!r}; it is not a complete SAELens SAE.")
        t = tensors.pop(name)
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{folder}/{SAELENS_WEIGHTS} holds {name} of shape {list(t.shape)}, but "
                             f"{SAELENS_CONFIG} implies {list(shapes[name])}; the folder is inconsistent.")
        out[name] = t
    return out


def _whole(k, d_sae):
    """k as an int when it is a whole number from 1 to d_sae (SAELens's BatchTopK k is a float), else None."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k != int(k):
        return None
    return int(k) if 1 <= k <= d_sae else None


def load_saelens(folder, device=None):
    """An SAE of ours from a SAELens folder (`cfg.json` + `sae_weights.safetensors`), SAELens 6
    layout or older (see _read_saelens_config).

    SAELens's forward pass (sae_lens/saes/*.py), with h = x - b_dec * apply_b_dec_to_input:
        standard   f = ReLU(h @ W_enc + b_enc)                                  -> ReLUSAE
        jumprelu   pre = h @ W_enc + b_enc; f = ReLU(pre) * (pre > threshold)   -> JumpReLUSAE
                   (a threshold below 0 as 0, the same features: relu_gate_threshold)
        topk       pre = h @ W_enc + b_enc (* ||W_dec_i|| with rescale_acts_by_decoder_norm);
                   f = ReLU of the row's k largest, 0 elsewhere                 -> TopKSAE
        gated      f = (h @ W_enc + b_gate > 0) * ReLU(h @ (W_enc * exp(r_mag)) + b_mag) -> GatedSAE
        x_hat = f @ W_dec + b_dec (f / ||W_dec_i|| with the rescale; f * scaling_factor when
        SAELens 5's finetuning_scaling_factor is on).
    SAELens saves a trained BatchTopK SAE as "jumprelu" with every threshold equal to its global
    threshold (batchtopk_sae.py); when its metadata says so and the input is centred, it becomes
    our BatchTopKSAE (f = pre where pre > max(threshold, 0)), otherwise a JumpReLUSAE. A BatchTopK
    training checkpoint (architecture "batchtopk", a topk_threshold buffer) reads the same way.
    Folds (exact in real arithmetic): a ReLU SAE's pre-encoder bias into b_enc
    (b_enc - b_dec @ W_enc); an uncentred TopK / Gated / BatchTopK SAE, which ours always centre,
    into b_enc + b_dec @ W_enc (b_gate, and b_mag with exp(r_mag)); the decoder-norm rescale into
    W_enc * n, b_enc * n, W_dec / n. metadata gets "model" from SAELens's model_name, "layer" and
    "site" from a TransformerLens hook_name (else "hook" is the hook_name), "context" from
    context_size, and SAELens's other metadata entries.
    """
    folder = Path(folder)
    sae_folder.check_files(folder, (SAELENS_CONFIG, SAELENS_WEIGHTS), "a SAELens SAE folder")
    cfg, meta = _read_saelens_config(folder)
    _check_saelens_config(folder, cfg)
    w = _saelens_weights(folder, cfg)
    training = meta.get("training_architecture_details")
    training = training if isinstance(training, dict) else {}
    sae = _saelens_sae(folder, cfg, meta, training, w, device)
    sae.metadata = {k: v for k, v in meta.items()
                    if k not in SAELENS_FORMAT_KEYS and k not in RESERVED and v is not None}
    if meta.get("model_name") is not None:
        sae.metadata["model"] = meta["model_name"]
    if meta.get("context_size") is not None:
        sae.metadata["context"] = sae.metadata.pop("context_size")
    if sae.metadata.get("prepend_bos") is False:
        sae.metadata["bos"] = None                # no BOS first
    if "bos" in sae.metadata:                     # then prepend_bos says no more than bos does
        sae.metadata.pop("prepend_bos", None)
    site = harvest.tl_site(meta.get("hook_name"))
    if site:                      # a TransformerLens name: our layer and site, and our module path if we wrote it
        sae.metadata.update(layer=site[0], site=site[1])
        if meta.get("hook_module") is not None:
            sae.metadata["hook"] = meta["hook_module"]
    elif meta.get("hook_name") is not None:
        sae.metadata["hook"] = meta["hook_name"]
    return sae


def _check_saelens_config(folder, cfg):
    """One-sentence errors for what no SAE here computes: another architecture or activation,
    per-input normalisation, a decoder normalised in the forward pass, an unknown dtype."""
    where = f"{folder}/{SAELENS_CONFIG}"
    arch = cfg.get("architecture")
    if arch not in ("standard", "jumprelu", "topk", "gated", "batchtopk"):
        raise ValueError(f"{folder} holds a SAELens {arch!r} SAE; this reads standard, jumprelu, topk, gated and "
                         "batchtopk ones.")
    for key in ("d_in", "d_sae"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{where} has no valid {key!r} (a positive integer); it is damaged.")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none"):
        hint = ("the scale it expects is not in the folder: fold it in SAELens (fold_activation_norm_scaling_factor) "
                "and save again" if norm == "expected_average_only_in" else "the SAE cannot be used without it")
        raise ValueError(f"{where} normalises the activations ({norm!r}), which no SAE here can hold exactly; {hint}.")
    activation = cfg.get("activation_fn", "relu")
    if activation not in ("relu", "topk") or (activation == "topk" and arch != "topk"):
        raise ValueError(f"{where} uses the activation {activation!r} in a {arch} SAE, which no SAE here computes.")
    if cfg.get("normalize_decoder"):
        raise ValueError(f"{where} sets normalize_decoder, which no SAE here computes; fold the decoder norms first.")
    if str(cfg.get("dtype", "float32")).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"{where} has dtype {cfg.get('dtype')!r}, none of {', '.join(DTYPES)}.")


def _saelens_weights(folder, cfg):
    """The tensors of the folder's architecture, checked against cfg.json's shapes, with SAELens 5's
    scaling factor folded into W_dec and TopK's decoder-norm rescale into the encoder and decoder."""
    arch, d_in, d_sae = cfg["architecture"], cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "topk_threshold": ()}
    shapes.update({name: (d_sae,) for name in ("b_enc", "b_gate", "b_mag", "r_mag", "threshold", "log_threshold")})
    tensors = _saelens_tensors(folder, DTYPES[str(cfg.get("dtype", "float32")).removeprefix("torch.")])
    w = _take(folder, tensors, ("W_enc", "W_dec", "b_dec"), shapes)
    # SAELens 5: decode (f * scaling_factor) @ W_dec, the same as f @ (scaling_factor[:, None] * W_dec).
    if "scaling_factor" in tensors:
        s_F = _take(folder, tensors, ("scaling_factor",), {"scaling_factor": (d_sae,)})["scaling_factor"]
        if not bool((s_F == 1).all()):
            if not cfg.get("finetuning_scaling_factor"):
                raise ValueError(f"{folder}/{SAELENS_WEIGHTS} holds a scaling_factor but {SAELENS_CONFIG} does not "
                                 "set finetuning_scaling_factor; the folder is inconsistent.")
            w["W_dec"] = (w["W_dec"].double() * s_F.double()[:, None]).float()
    if arch == "gated":
        w.update(_take(folder, tensors, ("b_gate", "b_mag", "r_mag"), shapes))
    elif arch == "jumprelu":
        name = "log_threshold" if "log_threshold" in tensors and "threshold" not in tensors else "threshold"
        w.update(_take(folder, tensors, ("b_enc", name), shapes))
    else:
        w.update(_take(folder, tensors, ("b_enc", "topk_threshold") if arch == "batchtopk" else ("b_enc",), shapes))
    if tensors:
        raise ValueError(f"{folder}/{SAELENS_WEIGHTS} holds tensors a SAELens {arch} SAE does not have "
                         f"({', '.join(sorted(tensors))}); it is not a {arch} SAE folder.")
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
        n_F = w["W_dec"].double().norm(dim=1)
        if not bool((n_F > 0).all()):
            raise ValueError(f"{folder}/{SAELENS_WEIGHTS} has decoder rows of norm 0, which "
                             "rescale_acts_by_decoder_norm divides by; the SAE is damaged.")
        w["W_enc"] = w["W_enc"].double() * n_F
        w["b_enc"] = w["b_enc"].double() * n_F
        w["W_dec"] = w["W_dec"].double() / n_F[:, None]
    return w


def _saelens_sae(folder, cfg, meta, training, w, device):
    """Our SAE computing the SAELens SAE's features, with the folds load_saelens describes."""
    arch, d_in, d_sae, centred = cfg["architecture"], cfg["d_in"], cfg["d_sae"], bool(cfg.get("apply_b_dec_to_input", True))
    where = f"{folder}/{SAELENS_CONFIG}"
    hW = lambda: w["b_dec"].double() @ w["W_enc"].double()           # b_dec @ W_enc [d_sae], for the folds
    if arch == "standard":
        # ReLUSAE has no pre-encoder bias: (x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc).
        if centred:
            w["b_enc"] = w["b_enc"].double() - hW()
        return assemble(baselines.ReLUSAE(d_in, d_sae, device="meta"), w, device)
    if arch == "gated":
        # Ours always centre: x @ W_enc + b = (x - b_dec) @ W_enc + (b + b_dec @ W_enc), on both paths.
        if not centred:
            hW_F = hW()
            w["b_gate"] = w["b_gate"].double() + hW_F
            w["b_mag"] = w["b_mag"].double() + hW_F * w["r_mag"].double().exp()
        return assemble(baselines.GatedSAE(d_in, d_sae, device="meta"), w, device)
    if arch == "topk":
        k = _whole(cfg.get("k"), d_sae)
        if k is None:
            raise ValueError(f"{where} has no valid 'k' (a whole number from 1 to d_sae={d_sae}); it is damaged.")
        if not centred:
            w["b_enc"] = w["b_enc"].double() + hW()
        return assemble(baselines.TopKSAE(d_in, d_sae, k, device="meta"), w, device)
    if arch == "batchtopk":                                           # jumprelu or batchtopk from here
        theta = w.pop("topk_threshold").reshape(())
        k = _whole(cfg.get("k"), d_sae)
    else:
        theta_F = w["threshold"] if "threshold" in w else w["log_threshold"].double().exp()
        uniform = bool((theta_F == theta_F[0]).all())
        k = _whole(training.get("k"), d_sae) if meta.get("training_architecture") == "batchtopk" else None
        theta = theta_F[0] if uniform and k is not None and centred else None
    if theta is not None:                                             # our BatchTopKSAE
        if k is None:
            raise ValueError(f"{where} has no valid 'k' (a whole number from 1 to d_sae={d_sae}) for its "
                             "BatchTopK SAE; it is damaged.")
        if not centred:
            w["b_enc"] = w["b_enc"].double() + hW()
        w = {name: w[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        return assemble(baselines.BatchTopKSAE(d_in, d_sae, k, device="meta"), {**w, "threshold": theta}, device)
    if "threshold" in w:
        w["threshold"] = relu_gate_threshold(w["threshold"])
    bandwidth = training.get("jumprelu_bandwidth", 0.001)
    ok = isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) and 0 < bandwidth < math.inf
    return _jumprelu_sae(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], threshold=w.get("threshold"),
                         log_threshold=w.get("log_threshold"), pre_encoder_bias=centred,
                         bandwidth=bandwidth if ok else 0.001, device=device)


def save_saelens(sae, folder):
    """Write `sae` (any architecture of baselines.ARCHITECTURES) as a SAELens 6 folder that
    `sae_lens.SAE.load_from_disk(folder)` reads (checked against SAELens 6.54: cfg.json in the
    layout of SAEConfig.to_dict, the state-dict names of its inference classes, float32).

        jumprelu   -> "jumprelu", apply_b_dec_to_input = pre_encoder_bias; W_enc, W_dec, b_enc, b_dec, threshold
        relu       -> "standard", apply_b_dec_to_input False; W_enc, W_dec, b_enc, b_dec
        gated      -> "gated", apply_b_dec_to_input True; W_enc, W_dec, b_dec, b_gate, b_mag, r_mag
        topk       -> "topk" with k, rescale_acts_by_decoder_norm False; W_enc, W_dec, b_enc, b_dec
        batchtopk  -> "jumprelu" with every threshold = the global one (as SAELens saves its own
                      BatchTopK SAEs; f = ReLU(pre) * (pre > t) = ours for any t), metadata
                      training_architecture "batchtopk" and k, which load_saelens reads back.
    Our metadata goes into SAELens's, with the names its tools look things up by: model ->
    model_name as a hub id (harvest.hub_id: "smollm2" is HuggingFaceTB/SmolLM2-135M-Instruct), layer
    and site -> hook_name as TransformerLens names it (blocks.6.hook_resid_post, hook_mlp_out,
    hook_attn_out), our module path (hook) -> hook_module, the harvest's context -> context_size and
    whether it put a BOS first -> prepend_bos (both required by SAELens's evaluations); the rest as
    it is. load_saelens maps them back. Both files are written to a
    temporary name and renamed (atomic_write), the weights first.
    """
    arch = sae.architecture
    if arch not in baselines.ARCHITECTURES:
        raise ValueError(f"save_saelens writes {', '.join(baselines.ARCHITECTURES)} SAEs, not {arch!r}.")
    names = {"jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
             "relu": ("W_enc", "W_dec", "b_enc", "b_dec"), "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
             "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"),
             "batchtopk": ("W_enc", "W_dec", "b_enc", "b_dec")}[arch]
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous() for name in names}
    md = dict(sae.metadata)
    meta = {k: v for k, v in md.items() if k not in ("model", "hook", "context")}
    if md.get("context") is not None:          # what SAELens's ActivationsStore.from_sae, and so its evals, require
        meta.update(context_size=md["context"], prepend_bos=md.get("bos") is not None)
    named = isinstance(md.get("layer"), int) and md.get("site") in harvest.SITES
    meta.update(sae_lens_version=SAELENS_FORMAT_VERSION, sae_lens_training_version=SAELENS_FORMAT_VERSION,
                model_name=harvest.hub_id(md["model"]) if md.get("model") else None,
                hook_name=harvest.tl_hook_name(md["layer"], md["site"]) if named else md.get("hook"))
    if named and md.get("hook"):
        meta["hook_module"] = md["hook"]
    cfg = {"architecture": {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch), "d_in": sae.d_in,
           "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": bool(getattr(sae, "pre_encoder_bias", arch != "relu")),
           "normalize_activations": "none", "reshape_activations": "none"}
    if arch == "jumprelu":
        meta.update(training_architecture="jumprelu", training_architecture_details={"jumprelu_bandwidth": sae.bandwidth})
    elif arch == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    elif arch == "batchtopk":
        tensors["threshold"] = sae.threshold.detach().float().cpu().expand(sae.d_sae).contiguous()
        meta.update(training_architecture="batchtopk", training_architecture_details={"k": sae.k})
    cfg["metadata"] = meta
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = save_safetensors(tensors)
    atomic_write(folder / SAELENS_WEIGHTS, lambda f: f.write(data))
    atomic_write(folder / SAELENS_CONFIG, lambda f: f.write((json.dumps(cfg, indent=2) + "\n").encode()))
    return folder


# --- Any of the three ----------------------------------------------------------------------


def layout(path):
    """Which SAE `path` holds, told by its files: "gemma_scope" (a params.npz, a Gemma Scope 2
    params.safetensors, or the folder of either), "ours" (config.json or sae.safetensors), "saelens"
    (cfg.json + sae_weights.safetensors) or None."""
    path = Path(path)
    if (path.is_file() and path.name in GEMMA_SCOPE_FILES or path.suffix == ".npz") or \
            (path.is_dir() and any((path / f).is_file() for f in GEMMA_SCOPE_FILES)):
        return "gemma_scope"                  # a Gemma Scope 2 folder may hold a config.json of its own
    if path.is_dir() and ((path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file()):
        return "ours"
    if path.is_dir() and (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    return None


# The argparse type of an SAE argument (evaluate.py, export.py, this script): a path in one of the layouts.
sae_path = cli.check(str, lambda t: t and layout(t), f"an SAE folder (ours or SAELens's) or a Gemma Scope {GEMMA_SCOPE_FILE}")


def load_sae(path, device=None):
    """Any SAE: our folder (any architecture, told by config.json's "architecture"), a Gemma Scope
    params.npz (or its folder), or a SAELens folder; see `layout`."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass an SAE folder (this project's or SAELens's) or a Gemma Scope "
                         f"{GEMMA_SCOPE_FILE}.")
    kind = layout(path)
    if kind == "ours":
        return sae_folder.load(path, device=device)
    if kind:
        return (load_gemma_scope if kind == "gemma_scope" else load_saelens)(path, device=device)
    raise ValueError(f"{path} is none of the SAE layouts read here: a folder with {CONFIG_NAME} and "
                     f"{WEIGHTS_NAME} (this project), a Gemma Scope {GEMMA_SCOPE_FILE} or its folder, or a "
                     f"SAELens folder with {SAELENS_CONFIG} and {SAELENS_WEIGHTS}.")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("src", type=sae_path, help="our SAE folder, a Gemma Scope params.npz (or its folder), or a SAELens folder")
    p.add_argument("--out", required=True, type=cli.out_folder, help="folder to write (created)")
    p.add_argument("--saelens", action="store_true", help="write SAELens's layout (default: this project's)")
    args = p.parse_args(argv)
    try:
        sae = load_sae(args.src)
        save_saelens(sae, args.out) if args.saelens else sae_folder.save(sae, args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: writing to {args.out} failed ({e.strerror or e}); free space or fix the folder and rerun.")
    print(f"wrote {args.out} ({'SAELens' if args.saelens else 'this project'}'s layout): a {sae.architecture} SAE, "
          f"d_in {sae.d_in}, d_sae {sae.d_sae}" + (f", k {sae.k}" if hasattr(sae, "k") else ""))


if __name__ == "__main__":
    main()
