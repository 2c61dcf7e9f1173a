"""Tests for formats.py: Gemma Scope and SAELens files built here, read against NumPy references.

The files are written the way their sources write them (Gemma Scope: np.savez of five float32
arrays; SAELens 6: SAE.save_model, cfg.json = SAEConfig.to_dict() and the state dict as
safetensors; SAELens 3-5: the flat cfg.json of its pretrained SAEs). The references implement
each source's own forward pass from its definition (Gemma Scope's tutorial; SAELens's
sae_lens/saes/*.py, read at version 6.54), not from formats.py or our classes. Weights on small
binary grids make every float32 sum exact, so most comparisons are exact equalities.

    python -m pytest test_formats.py                          # quick, deterministic (CI)
    HYPOTHESIS_PROFILE=dev python -m pytest test_formats.py   # many more examples
"""

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file, save_file

import acts
import baselines
import evaluate
import export
import formats
import harvest
import sae_folder
from jumprelu import JumpReLUSAE

SAELENS_NAMES = {"jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
                 "standard": {"W_enc", "W_dec", "b_enc", "b_dec"}, "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
                 "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}}


# --- The references: each source's own forward pass ----------------------------------------


def ref_gemma_scope(p, x):
    """Gemma Scope's tutorial: pre = x W_enc + b_enc; f = (pre > threshold) * ReLU(pre)."""
    pre = x @ p["W_enc"] + p["b_enc"]
    f = (pre > p["threshold"]) * np.maximum(pre, 0.0)
    return f, f @ p["W_dec"] + p["b_dec"]


def ref_saelens(folder, x):
    """SAELens's SAE.encode / decode for the folder: h = x - b_dec * apply_b_dec_to_input, then
    standard ReLU(h W_enc + b_enc); jumprelu ReLU(pre) * (pre > threshold); topk ReLU of the
    row's k largest of pre (times ||W_dec_i|| with rescale_acts_by_decoder_norm); gated
    (h W_enc + b_gate > 0) * ReLU(h (W_enc exp(r_mag)) + b_mag); a BatchTopK training checkpoint
    as SAELens saves it for inference, a JumpReLU at topk_threshold. Decode (f [/ ||W_dec_i||]
    [* scaling_factor]) W_dec + b_dec. Configs of SAELens 3-5 name the activation
    activation_fn_str, with k in activation_fn_kwargs."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: a.astype(np.float64) for name, a in load_file(folder / "sae_weights.safetensors").items()}
    arch, k = cfg.get("architecture", "standard"), cfg.get("k")
    if cfg.get("activation_fn_str") == "topk":
        arch, k = "topk", cfg["activation_fn_kwargs"]["k"]
    h = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    norm = np.linalg.norm(w["W_dec"], axis=1) if cfg.get("rescale_acts_by_decoder_norm") else None
    if arch == "gated":
        gate = h @ w["W_enc"] + w["b_gate"]
        mag = h @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
        f = (gate > 0) * np.maximum(mag, 0.0)
    else:
        pre = h @ w["W_enc"] + w["b_enc"]
        if norm is not None:
            pre = pre * norm
        if arch == "standard":
            f = np.maximum(pre, 0.0)
        elif arch in ("jumprelu", "batchtopk"):
            theta = (w["topk_threshold"] if arch == "batchtopk" else
                     w["threshold"] if "threshold" in w else np.exp(w["log_threshold"]))
            f = np.maximum(pre, 0.0) * (pre > theta)
        else:
            keep = np.zeros(pre.shape, bool)
            np.put_along_axis(keep, np.argsort(-pre, axis=1, kind="stable")[:, :k], True, axis=1)
            f = np.where(keep, np.maximum(pre, 0.0), 0.0)
    g = f / norm if norm is not None else f
    if "scaling_factor" in w and cfg.get("finetuning_scaling_factor"):
        g = g * w["scaling_factor"]
    return f, g @ w["W_dec"] + w["b_dec"]


# --- Writing the files as their sources do -------------------------------------------------


def write_gemma_scope(path, p, names=("W_enc", "W_dec", "b_enc", "b_dec", "threshold")):
    """params.npz as Gemma Scope ships it: five float32 arrays (optionally under other names)."""
    np.savez(path, **{new: np.asarray(p[old], np.float32)
                      for old, new in zip(("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), names)})
    return path


def write_saelens(folder, arch, w, *, apply=True, version="6.54.12", dtype="float32", metadata=None, **extra):
    """A folder as SAELens 6's SAE.save_model writes it: cfg.json is SAEConfig.to_dict()
    (json.dump), sae_weights.safetensors the state dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    D, F = np.shape(w["W_enc"])
    meta = {"sae_lens_version": version, "sae_lens_training_version": version, "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None, "context_size": 128,
            "prepend_bos": True, **(metadata or {})}
    cfg = {"d_in": D, "d_sae": F, "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": apply,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta,
           "architecture": arch, **extra}
    save_file({name: np.array(a, np.float32, order="C") for name, a in w.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_saelens_5(folder, w, drop=(), **cfg):
    """A folder in the flat cfg.json of SAELens 3-5 (its pretrained SAEs): no sae_lens_version,
    hook_name (or hook_point), activation_fn_str and activation_fn_kwargs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    D, F = np.shape(w["W_enc"])
    base = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
            "model_name": "gpt2-small", "hook_name": "blocks.6.hook_resid_pre", "hook_layer": 6,
            "hook_head_index": None, "activation_fn_str": "relu", "activation_fn_kwargs": {},
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": "3.0.0",
            "prepend_bos": True, "dataset_path": "Skylion007/openwebtext", "context_size": 128,
            "normalize_activations": "none"}
    save_file({name: np.array(a, np.float32, order="C") for name, a in w.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in {**base, **cfg}.items() if k not in drop}))
    return folder


# --- Small SAEs whose float32 arithmetic is exact -------------------------------------------


def grid(draw, shape, lo, hi, step):
    return draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, hi))).astype(np.float64) * step


@st.composite
def dyadic_sae(draw, arch):
    """Weights (float64, exactly float32) and inputs for a small `arch` SAE.

    x and b_dec in quarters, W_enc in eighths, W_dec in eighths up to 1/4: every pre-activation is
    a multiple of 2^-12 below 40 and every x_hat a multiple of 2^-15 below 200, exact in float32
    in any summation order. Each latent's encoder bias carries its own offset j * 2^-12 (j a
    permutation of at most 24 latents), which no sum of 64ths can cancel: no two pre-activations
    of a row tie, so TopK's choice is unique. Thresholds are half-way between grid points, so a
    threshold one float32 step off (a log that exp cannot invert exactly) decides the same.
    """
    D, F, B = draw(st.integers(1, 8)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    offsets = np.array(draw(st.permutations(range(F))), np.float64) * 2.0 ** -12
    w = {"W_enc": grid(draw, (D, F), -8, 8, 1 / 8), "W_dec": grid(draw, (F, D), -2, 2, 1 / 8),
         "b_dec": grid(draw, (D,), -8, 8, 1 / 4)}
    if arch == "gated":
        w["b_gate"] = grid(draw, (F,), -8, 8, 1 / 8) + offsets
        w["b_mag"] = grid(draw, (F,), -8, 8, 1 / 8)
        w["r_mag"] = np.asarray(draw(hnp.arrays(np.float32, (F,), elements=st.floats(-1, 1, width=32))), np.float64)
    else:
        w["b_enc"] = grid(draw, (F,), -8, 8, 1 / 8) + offsets
    if arch == "jumprelu":
        w["threshold"] = (grid(draw, (F,), 0, 8000, 1.0) + 0.5) * 2.0 ** -12
    x = grid(draw, (B, D), -8, 8, 1 / 4)
    return w, x


def our_sae(arch, w, k=None, **kwargs):
    """One of our SAEs with the weights w (JumpReLU: its threshold, through log_threshold)."""
    D, F = w["W_enc"].shape
    sae = baselines.make_sae(arch, D, F, k=k, **kwargs)
    with torch.no_grad():
        for name, value in w.items():
            if arch == "jumprelu" and name == "threshold":
                sae.log_threshold.copy_(torch.tensor(value, dtype=torch.float32).log())
            else:
                getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    return sae


def run(sae, x):
    with torch.no_grad():
        x_t = torch.tensor(x, dtype=torch.float32)
        return sae.encode(x_t).double().numpy(), sae(x_t).double().numpy()


# --- Gemma Scope ---------------------------------------------------------------------------


def test_gemma_scope_hand_computed(tmp_path):
    # pre = x W_enc + b_enc = [1, 0.5, 2] for x = [1, 1]; thresholds [0.5, 0.25, 2.5] keep the
    # first two; x_hat = 1 * [1, 0] + 0.5 * [0, 2] + b_dec.
    p = {"W_enc": [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], "b_enc": [0.0, -0.5, 0.0], "threshold": [0.5, 0.25, 2.5],
         "W_dec": [[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], "b_dec": [0.25, -0.25]}
    sae = formats.load_gemma_scope(write_gemma_scope(tmp_path / "params.npz", p))
    assert isinstance(sae, JumpReLUSAE) and not sae.pre_encoder_bias and (sae.d_in, sae.d_sae) == (2, 3)
    f, x_hat = run(sae, np.array([[1.0, 1.0]]))
    np.testing.assert_array_equal(f, [[1.0, 0.5, 0.0]])
    np.testing.assert_array_equal(x_hat, [[1.25, 0.75]])
    assert sae.metadata["source"] == "gemma-scope"


@given(case=dyadic_sae("jumprelu"), as_folder=st.booleans(), lower=st.booleans())
def test_gemma_scope_gives_its_own_features(case, as_folder, lower):
    w, x = case
    with tempfile.TemporaryDirectory() as d:
        names = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if lower else ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
        path = write_gemma_scope(Path(d) / "params.npz", w, names)
        sae = formats.load_gemma_scope(d if as_folder else path)
    f, x_hat = run(sae, x)
    f_ref, x_hat_ref = ref_gemma_scope(w, x)
    np.testing.assert_array_equal(f, f_ref)
    np.testing.assert_array_equal(x_hat, x_hat_ref)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_array_equal(getattr(sae, name).detach().numpy(), w[name])
    # Thresholds to within a few float32 steps (see the next test); half-way between the grid
    # points of the pre-activations, they decide exactly as Gemma Scope's.
    np.testing.assert_allclose(sae.threshold.detach().numpy(), w["threshold"], rtol=2e-6)


def test_gemma_scope_thresholds_within_four_float32_steps(tmp_path):
    """JumpReLUSAE holds log(theta) in float32, and exp of a float32 reaches only some float32
    thetas: where none gives theta exactly, sae_folder.exact_log takes the nearest, up to 4 steps
    away for thresholds in [0.01, 3] (exact for about 92% of them). A latent decides differently
    from Gemma Scope only when its pre-activation lies within those few steps of theta."""
    g = np.random.default_rng(0)
    D, F = 8, 4096
    p = {"W_enc": g.normal(size=(D, F)), "W_dec": g.normal(size=(F, D)), "b_enc": g.normal(size=F),
         "b_dec": g.normal(size=D), "threshold": g.uniform(0.01, 3.0, size=F)}
    sae = formats.load_gemma_scope(write_gemma_scope(tmp_path / "params.npz", p))
    theta = p["threshold"].astype(np.float32)
    np.testing.assert_array_max_ulp(sae.threshold.detach().numpy(), theta, maxulp=4)
    assert (sae.threshold.detach().numpy() == theta).mean() > 0.85


def _bad_npz(tmp_path, **change):
    p = {"W_enc": np.ones((3, 5)), "W_dec": np.ones((5, 3)), "b_enc": np.zeros(5), "b_dec": np.zeros(3),
         "threshold": np.full(5, 0.5)}
    p.update(change)
    np.savez(tmp_path / "params.npz", **{k: v for k, v in p.items() if v is not None})
    return tmp_path / "params.npz"


@pytest.mark.parametrize("change, message", [
    ({"threshold": None}, "has no array 'threshold'"),
    ({"b_dec": np.zeros(4)}, r"holds b_dec of shape \[4\], but W_enc \[3, 5\] implies \[3\]"),
    ({"W_enc": np.ones(15)}, r"W_enc of shape \[15\], not \[d_in, d_sae\]"),
    ({"W_dec": np.ones((5, 3), np.int32)}, "holds W_dec as int32, not floating point"),
    ({"b_enc": np.array([0.0, np.nan, 0.0, 0.0, 0.0])}, "holds NaN or Inf in b_enc"),
])
def test_gemma_scope_errors_are_one_sentence(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        formats.load_gemma_scope(_bad_npz(tmp_path, **change))


def test_gemma_scope_unreadable_files(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="cannot be read as a .npz archive"):
        formats.load_gemma_scope(tmp_path)
    np.save(tmp_path / "one.npy", np.ones(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match="holds a single array"):
        formats.load_gemma_scope(tmp_path / "one.npz")
    with pytest.raises(ValueError, match="has no params.npz"):
        formats.load_gemma_scope(tmp_path / "nowhere")


GEMMA_SCOPE_2 = Path(__file__).parent / "fixtures" / "gemma_scope_2" / "resid_post" / "layer_3_width_64_l0_small"


def test_a_gemma_scope_2_folder_loads_and_encodes_as_gemma_scope_defines_it(tmp_path):
    """fixtures/gemma_scope_2 (made to Gemma Scope 2's layout by fixtures/make_gemma_scope_2_fixture.py):
    its folder, with a config.json of its own, reads as Gemma Scope 2, gives the features and
    reconstruction of the definition in float64 NumPy (a threshold below 0 as 0), and says its
    model, layer and site; a transcoder's params are refused."""
    assert formats.layout(GEMMA_SCOPE_2) == formats.layout(GEMMA_SCOPE_2 / "params.safetensors") == "gemma_scope"
    sae = formats.load_sae(GEMMA_SCOPE_2)
    p = {re.sub(r"^w_", "W_", k): v.astype(np.float64) for k, v in load_file(GEMMA_SCOPE_2 / "params.safetensors").items()}
    assert p["threshold"].min() < 0 and isinstance(sae, JumpReLUSAE) and not sae.pre_encoder_bias
    x = np.random.default_rng(0).normal(0, 1.0, (500, 16))
    f_ref, x_hat_ref = ref_gemma_scope(p, x)
    assert 0 < (f_ref != 0).mean() < 0.5
    with torch.no_grad():
        f, x_hat = sae.encode(torch.from_numpy(x)), sae(torch.from_numpy(x))
    np.testing.assert_allclose(f.numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat.numpy(), x_hat_ref, rtol=1e-5, atol=1e-4)
    assert {k: sae.metadata[k] for k in ("source", "model", "layer", "site")} == \
        {"source": "gemma-scope-2", "model": "google/gemma-3-1b-pt", "layer": 3, "site": "resid"}
    save_file({**{k: v.astype(np.float32) for k, v in load_file(GEMMA_SCOPE_2 / "params.safetensors").items()},
               "affine_skip_connection": np.zeros((16, 16), np.float32)}, tmp_path / "params.safetensors")
    with pytest.raises(ValueError, match="is a transcoder"):
        formats.load_sae(tmp_path)
    (tmp_path / "params.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="cannot be read as a safetensors file"):
        formats.load_sae(tmp_path)


# --- SAELens -------------------------------------------------------------------------------


def test_saelens_hand_computed_folds(tmp_path):
    # standard, centred: h = x - b_dec = [1, -1], f = ReLU(h) = [1, 0]; our ReLUSAE holds the
    # centring in b_enc = -b_dec @ W_enc = [-1, 0].
    w = {"W_enc": np.eye(2), "b_enc": np.zeros(2), "W_dec": np.eye(2), "b_dec": np.array([1.0, 0.0])}
    sae = formats.load_saelens(write_saelens(tmp_path / "std", "standard", w))
    assert isinstance(sae, baselines.ReLUSAE)
    np.testing.assert_array_equal(sae.b_enc.detach().numpy(), [-1.0, 0.0])
    np.testing.assert_array_equal(run(sae, np.array([[2.0, -1.0]]))[0], [[1.0, 0.0]])
    # topk k=1, not centred: pre = x W_enc + b_enc = [2, -1] keeps latent 0; ours centre, so
    # b_enc becomes b_enc + b_dec @ W_enc = [1, 0].
    sae = formats.load_saelens(write_saelens(tmp_path / "topk", "topk", w, apply=False, k=1,
                                             rescale_acts_by_decoder_norm=False))
    assert isinstance(sae, baselines.TopKSAE) and sae.k == 1
    np.testing.assert_array_equal(sae.b_enc.detach().numpy(), [1.0, 0.0])
    np.testing.assert_array_equal(run(sae, np.array([[2.0, -1.0]]))[0], [[2.0, 0.0]])
    assert (sae.metadata["model"], sae.metadata["layer"], sae.metadata["site"]) == ("gpt2", 3, "resid")   # from blocks.3.hook_resid_post


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "gated"])
@given(data=st.data(), apply=st.booleans(), rescale=st.booleans())
def test_saelens_gives_its_own_features(arch, data, apply, rescale):
    w, x = data.draw(dyadic_sae(arch))
    F = w["W_enc"].shape[1]
    extra = {"k": data.draw(st.integers(1, F)), "rescale_acts_by_decoder_norm": rescale} if arch == "topk" else {}
    if arch == "topk" and rescale:      # rescaling divides by the decoder norms
        w["W_dec"][np.linalg.norm(w["W_dec"], axis=1) == 0, 0] = 0.125
    with tempfile.TemporaryDirectory() as d:
        write_saelens(d, arch, w, apply=apply, **extra)
        sae = formats.load_saelens(d)
        f_ref, x_hat_ref = ref_saelens(d, x)
    assert sae.architecture == {"standard": "relu"}.get(arch, arch)
    if arch == "jumprelu":
        assert sae.pre_encoder_bias == apply
    f, x_hat = run(sae, x)
    if arch == "gated" or extra.get("rescale_acts_by_decoder_norm"):
        # exp(r_mag) and the decoder norms are not binary fractions: the same up to float32 rounding
        # (a latent that opened or closed differently would differ by its whole value).
        np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-5, atol=1e-4)
    else:
        np.testing.assert_array_equal(f, f_ref)
        np.testing.assert_array_equal(x_hat, x_hat_ref)


@pytest.mark.parametrize("case", ["hook_point", "topk_activation", "normalize_false", "finetuning_scale",
                                  "jumprelu_log_threshold", "bfloat16"])
def test_saelens_older_and_other_configs(tmp_path, case):
    g = np.random.default_rng(1)
    D, F = 6, 20
    w = {"W_enc": g.normal(size=(D, F)).round(2), "W_dec": g.normal(size=(F, D)).round(2),
         "b_enc": g.normal(size=F).round(2) + np.arange(F) * 2.0 ** -12, "b_dec": g.normal(size=D).round(2)}
    x = g.normal(size=(30, D)).round(2)
    if case == "hook_point":             # SAELens 1-2 called the hook hook_point
        write_saelens_5(tmp_path, w, hook_point="blocks.2.hook_resid_post", drop=("hook_name", "architecture"))
        hook, arch = "blocks.2.hook_resid_post", "relu"
    elif case == "topk_activation":      # SAELens 4-5 TopK: a standard SAE with activation_fn_str topk
        write_saelens_5(tmp_path, w, activation_fn_str="topk", activation_fn_kwargs={"k": 3})
        hook, arch = "blocks.6.hook_resid_pre", "topk"
    elif case == "normalize_false":      # normalize_activations as a bool, centring off
        write_saelens_5(tmp_path, w, normalize_activations=False, apply_b_dec_to_input=False)
        hook, arch = "blocks.6.hook_resid_pre", "relu"
    elif case == "finetuning_scale":     # SAELens 3-5: decode (f * scaling_factor) W_dec
        w["scaling_factor"] = g.uniform(0.5, 2.0, size=F).round(2)
        write_saelens_5(tmp_path, w, finetuning_scaling_factor=True)
        hook, arch = "blocks.6.hook_resid_pre", "relu"
    elif case == "jumprelu_log_threshold":   # an early SAELens 6 JumpReLU training checkpoint
        w["log_threshold"] = np.log(g.uniform(0.1, 1.0, size=F)).astype(np.float32)
        write_saelens(tmp_path, "jumprelu", w)
        hook, arch = "blocks.3.hook_resid_post", "jumprelu"
    else:                                # weights stored float32, config bfloat16: SAELens rounds on load
        write_saelens(tmp_path, "standard", w, dtype="bfloat16")
        hook, arch = "blocks.3.hook_resid_post", "relu"
    sae = formats.load_saelens(tmp_path)
    site = harvest.tl_site(hook)           # a TransformerLens name of ours reads back as layer and site
    assert sae.architecture == arch and (sae.metadata["hook"] == hook if site is None else
                                         (sae.metadata["layer"], sae.metadata["site"]) == site)
    if case == "bfloat16":
        W = torch.tensor(w["W_enc"], dtype=torch.float32).to(torch.bfloat16).float()
        np.testing.assert_array_equal(sae.W_enc.detach().numpy(), W.numpy())
        return
    if case == "jumprelu_log_threshold":
        np.testing.assert_array_equal(sae.log_threshold.detach().numpy(), w["log_threshold"])
    f_ref, x_hat_ref = ref_saelens(tmp_path, x)
    f, x_hat = run(sae, x)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["inference", "inference_uncentred", "checkpoint", "checkpoint_rescaled",
                                  "unequal_thresholds"])
def test_saelens_batchtopk(tmp_path, case):
    """SAELens saves a BatchTopK SAE for inference as a JumpReLU with one threshold everywhere
    (metadata training_architecture "batchtopk"); its training checkpoints keep topk_threshold."""
    g = np.random.default_rng(2)
    D, F = 6, 20
    w = {"W_enc": g.normal(size=(D, F)).round(2), "W_dec": g.normal(size=(F, D)).round(2),
         "b_enc": g.normal(size=F).round(2), "b_dec": g.normal(size=D).round(2)}
    x = g.normal(size=(40, D)).round(2)
    batchtopk = {"training_architecture": "batchtopk", "training_architecture_details": {"k": 4.0}}
    if case.startswith("inference"):
        w["threshold"] = np.full(F, 0.375)
        write_saelens(tmp_path, "jumprelu", w, apply=case == "inference", metadata=batchtopk)
    elif case.startswith("checkpoint"):
        w["topk_threshold"] = np.array(0.375)
        write_saelens(tmp_path, "batchtopk", w, k=4.0, rescale_acts_by_decoder_norm=case.endswith("rescaled"),
                      metadata=batchtopk)
    else:
        w["threshold"] = np.linspace(0.1, 0.5, F)
        write_saelens(tmp_path, "jumprelu", w, metadata=batchtopk)
    sae = formats.load_saelens(tmp_path)
    # Uncentred, the JumpReLU is exact as it is (ours can leave b_dec out of the encoder).
    assert sae.architecture == ("jumprelu" if case in ("unequal_thresholds", "inference_uncentred") else "batchtopk")
    if sae.architecture == "batchtopk":
        assert sae.k == 4 and float(sae.threshold) == 0.375
    f_ref, x_hat_ref = ref_saelens(tmp_path, x)
    f, x_hat = run(sae, x)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-5, atol=1e-4)


def _good_saelens(tmp_path, arch="standard", **extra):
    w = {"W_enc": np.ones((3, 5)), "W_dec": np.ones((5, 3)), "b_enc": np.zeros(5), "b_dec": np.zeros(3)}
    if arch == "jumprelu":
        w["threshold"] = np.full(5, 0.5)
    if arch == "topk":
        extra.setdefault("k", 2)
    return write_saelens(tmp_path, arch, w, **extra)


def _edit(folder, cfg=None, drop=(), add=None, raw=None):
    if cfg is not None:
        c = json.loads((folder / "cfg.json").read_text())
        c.update(cfg)
        (folder / "cfg.json").write_text(json.dumps(c))
    if drop or add:
        w = load_file(folder / "sae_weights.safetensors")
        w = {k: v for k, v in w.items() if k not in drop}
        w.update(add or {})
        save_file(w, folder / "sae_weights.safetensors")
    if raw is not None:
        (folder / "cfg.json").write_text(raw)
    return folder


@pytest.mark.parametrize("arch, edit, message", [
    ("standard", {"cfg": {"architecture": "matryoshka_batchtopk"}}, "holds a SAELens 'matryoshka_batchtopk' SAE"),
    ("standard", {"cfg": {"normalize_activations": "layer_norm"}}, r"normalises the activations \('layer_norm'\)"),
    ("standard", {"cfg": {"normalize_activations": "expected_average_only_in"}}, "fold_activation_norm_scaling_factor"),
    ("standard", {"cfg": {"dtype": "int8"}}, "has dtype 'int8'"),
    ("standard", {"cfg": {"d_sae": 0}}, "no valid 'd_sae'"),
    ("standard", {"cfg": {"d_sae": 6}}, r"holds W_enc of shape \[3, 5\], but cfg.json implies \[3, 6\]"),
    ("standard", {"drop": ("b_enc",)}, "has no tensor 'b_enc'"),
    ("standard", {"add": {"extra": np.ones(2, np.float32)}}, r"does not have \(extra\)"),
    ("standard", {"add": {"scaling_factor": np.full(5, 2.0, np.float32)}}, "does not set finetuning_scaling_factor"),
    ("standard", {"add": {"W_dec": np.full((5, 3), np.nan, np.float32)}}, "holds NaN or Inf in W_dec"),
    ("standard", {"raw": "{not json"}, "is not valid JSON"),
    ("standard", {"cfg": {"sae_lens_version": None, "metadata": None, "activation_fn_str": "tanh-relu"}},
     "uses the activation 'tanh-relu'"),
    ("standard", {"cfg": {"sae_lens_version": None, "metadata": None, "activation_fn_str": "topk"}},
     "uses the activation 'topk' in a standard SAE"),             # SAELens 5 topk without its k
    ("topk", {"cfg": {"k": 9}}, r"no valid 'k' \(a whole number from 1 to d_sae=5\)"),
    ("jumprelu", {"add": {"threshold": np.array([0.5, 0.5, np.nan, 0.5, 0.5], np.float32)}}, "holds NaN or Inf in threshold"),
])
def test_saelens_errors_are_one_sentence(tmp_path, arch, edit, message):
    folder = _edit(_good_saelens(tmp_path, arch), **edit)
    with pytest.raises(ValueError, match=message):
        formats.load_saelens(folder)


def test_thresholds_at_or_below_zero_read_as_zero_with_the_sources_features(tmp_path):
    """Gemma Scope and SAELens compute ReLU(pre) * (pre > theta): a threshold of 0 fires on pre > 0,
    and so does one below 0. Both read as theta = 0 exactly; our own folders refuse theta < 0."""
    rng = np.random.default_rng(5)
    theta = np.array([0.5, 0.0, -1.0, 0.25, -1e-3], np.float32)
    p = {"W_enc": rng.normal(size=(3, 5)), "W_dec": rng.normal(size=(5, 3)), "b_enc": rng.normal(size=5) * 0.1,
         "b_dec": np.zeros(3), "threshold": theta}
    x = rng.normal(size=(200, 3))
    pre = x @ np.float32(p["W_enc"]) + np.float32(p["b_enc"])
    want = np.maximum(pre, 0) * (pre > theta)
    for sae in (formats.load_gemma_scope(write_gemma_scope(tmp_path / "params.npz", p)),
                formats.load_saelens(write_saelens(tmp_path / "sl", "jumprelu", p, apply=False))):
        assert torch.equal(sae.threshold[[1, 2, 4]], torch.zeros(3))
        f, _ = run(sae, x)
        np.testing.assert_array_equal(f != 0, want != 0)
        np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="has 2 thresholds below 0 or NaN"):
        sae_folder.load(_with_threshold(sae_folder.save(formats.load_saelens(tmp_path / "sl"), tmp_path / "ours"), theta))


def _with_threshold(folder, theta):
    """Our folder with its thresholds replaced (and its checksum dropped, as another tool would write it)."""
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    tensors = load_torch(folder / "sae.safetensors")
    save_torch({**tensors, "threshold": torch.tensor(theta)}, folder / "sae.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("sha256")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# --- Folders that sae-lens itself trained and wrote (fixtures/make_saelens_fixtures.py) ------

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"


def _acts_folder(folder, rows_ND):
    """An activation folder (both splits) holding rows_ND, for evaluate.py."""
    settings = dict(model="none", gguf_file=None, layer=0, site="resid", context=5, dtype="float32",
                    heldout_every=2, source={"text": "random"})
    manifest = acts.new_manifest(settings, "none", rows_ND.shape[1])
    for split in acts.SPLITS:
        (folder / split).mkdir(parents=True)
        acts.append_shard(folder, manifest, split, rows_ND, np.zeros((len(rows_ND) // 4, 5), np.int32))
    manifest["complete"] = True
    acts.write_manifest(folder, manifest)
    return folder


@pytest.mark.parametrize("name", ["jumprelu", "jumprelu_at_zero", "topk", "standard"])
def test_folders_sae_lens_wrote_load_with_its_features_evaluate_and_export(tmp_path, name, capsys, monkeypatch):
    """sae-lens 6.54.12 trained and saved these; without sae-lens, they load with the features of
    SAELens's forward pass computed in NumPy from the files, evaluate (on the CPU asked for, also where
    torch sees a GPU: faked below), and export with ONNX parity.
    SAELens leaves thresholds just below 0 (jumprelu) or at 0 (jumprelu_at_zero); either way
    f = ReLU(pre) * (pre > theta), which our JumpReLU computes with theta = 0."""
    folder = FIXTURES / name
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == "6.54.12" and cfg["d_in"] == 16 and cfg["d_sae"] == 64
    sae = formats.load_sae(folder)
    if name.startswith("jumprelu"):
        theta = load_file(folder / "sae_weights.safetensors")["threshold"]
        assert ((theta < 0) if name == "jumprelu" else (theta == 0)).sum() >= 1
        got = sae.threshold.detach().numpy()
        assert (got[theta <= 0] == 0).all()                                     # exactly 0, via log -inf
        np.testing.assert_allclose(got, np.maximum(theta, 0), rtol=5e-7, atol=0)   # within 4 float32 steps
    x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    f_ref, x_hat_ref = ref_saelens(folder, x.astype(np.float64))
    f, x_hat = run(sae, x)
    np.testing.assert_array_equal(f != 0, f_ref != 0)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    evaluate.main([str(folder), "--acts", str(_acts_folder(tmp_path / "acts", x)), "--json", str(tmp_path / "e.json"),
                   "--device", "cpu"])
    monkeypatch.undo()
    (record,) = json.loads((tmp_path / "e.json").read_text())
    assert record["l0"] == pytest.approx((f_ref != 0).sum(1).mean(), rel=1e-6)
    err = ((x - x_hat_ref) ** 2).sum(1)
    assert record["fvu"] == pytest.approx(err.sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    export.main([str(folder), "--out", str(tmp_path / "m.onnx"), "--acts", str(tmp_path / "acts")])
    assert "matches PyTorch within 1e-05" in capsys.readouterr().out


# --- Writing SAELens folders ---------------------------------------------------------------


VARIANTS = [("jumprelu", {}), ("jumprelu", {"pre_encoder_bias": True}), ("relu", {}), ("gated", {}),
            ("topk", {}), ("batchtopk", {})]


@pytest.mark.parametrize("arch, kwargs", VARIANTS)
@given(data=st.data())
def test_save_saelens_means_the_same_in_saelens_and_round_trips_exactly(arch, kwargs, data):
    w, x = data.draw(dyadic_sae("jumprelu" if arch == "jumprelu" else "gated" if arch == "gated" else "relu"))
    F = w["W_enc"].shape[1]
    k = data.draw(st.integers(1, F))
    sae = our_sae(arch, w, k=k, **kwargs)
    if arch == "batchtopk":      # the global threshold, or -1 (not estimated yet: a plain ReLU)
        sae.threshold.fill_(data.draw(st.sampled_from([-1.0, 0.0, 0.0625 + 2.0**-13, 1.5 + 2.0**-13])))
    sae.metadata = {"model": "smollm2", "layer": 6, "site": "resid", "hook": "model.layers.6", "input_scale": 0.5}
    with tempfile.TemporaryDirectory() as d:
        formats.save_saelens(sae, d)
        f_ref, x_hat_ref = ref_saelens(d, x)        # what SAELens computes with the folder
        back = formats.load_saelens(d)
    f, x_hat = run(sae, x)
    if arch == "gated":
        np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(f, f_ref)
        np.testing.assert_array_equal(x_hat, x_hat_ref)
    assert back.metadata == {**sae.metadata, "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}   # the hub's name
    assert type(back) is type(sae) and getattr(back, "k", k) == getattr(sae, "k", k)
    assert getattr(back, "pre_encoder_bias", None) == getattr(sae, "pre_encoder_bias", None)
    assert getattr(back, "bandwidth", None) == getattr(sae, "bandwidth", None)
    for name, t in sae.state_dict().items():
        if name == "log_threshold":       # several logs can give one threshold: compare thresholds
            assert torch.equal(back.threshold, sae.threshold)
        else:
            assert torch.equal(back.state_dict()[name], t), name


def test_saelens_own_loader_reads_what_we_write(tmp_path):
    """The real SAELens, where it is installed (pip install sae-lens; it is not a dependency, and
    this passed with 6.54.12), loads what save_saelens writes, with the same features and
    reconstruction, for every architecture."""
    sae_lens = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(0)
    for i, (arch, kwargs) in enumerate(VARIANTS):
        sae = baselines.make_sae(arch, 8, 32, k=4, **kwargs)
        with torch.no_grad():
            for name, q in sae.named_parameters():
                q.copy_(torch.randn(q.shape, generator=g) * 0.3 - (1.0 if name == "log_threshold" else 0.0))
            if arch == "batchtopk":
                sae.threshold.fill_(0.4)
        sae.metadata = {"model": "smollm2", "layer": 1, "site": "resid", "hook": "model.layers.1"}
        formats.save_saelens(sae, tmp_path / str(i))
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / str(i)))
        assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post", arch
        assert theirs.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct", arch
        x = torch.randn(100, 8, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5, msg=arch)
            torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5, msg=arch)


@pytest.mark.parametrize("arch, kwargs", VARIANTS)
def test_save_saelens_writes_what_saelens_reads(tmp_path, arch, kwargs):
    sae = baselines.make_sae(arch, 4, 12, k=3, **kwargs)
    sae.metadata = {"model": "smollm2", "layer": 6, "site": "mlp", "hook": "model.layers.6.mlp"}
    formats.save_saelens(sae, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]   # no temporaries
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    theirs = {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    # The fields of SAELens 6's SAEConfig (sae_lens/saes/sae.py), plus TopKSAEConfig's.
    assert {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "reshape_activations", "metadata"} <= set(cfg)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == \
        (theirs, 4, 12, "float32", "none")
    assert cfg["apply_b_dec_to_input"] == (arch != "relu" and kwargs.get("pre_encoder_bias", arch != "jumprelu"))
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6    # read as SAELens 6, not renamed
    # The names SAELens, TransformerLens and Neuronpedia look up: the hub id, the TransformerLens hook.
    assert (cfg["metadata"]["model_name"], cfg["metadata"]["hook_name"], cfg["metadata"]["hook_module"]) == \
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "blocks.6.hook_mlp_out", "model.layers.6.mlp")
    if arch == "topk":
        assert cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert set(tensors) == SAELENS_NAMES[theirs] and all(t.dtype == np.float32 for t in tensors.values())


@pytest.mark.parametrize("site, name", [("resid", "blocks.1.hook_resid_post"), ("mlp", "blocks.1.hook_mlp_out"),
                                        ("attn", "blocks.1.hook_attn_out")])
def test_saelens_names_the_site_as_transformerlens_and_reads_it_back(tmp_path, site, name):
    sae = baselines.make_sae("jumprelu", 4, 12)
    sae.metadata = {"model": "gpt2", "layer": 1, "site": site, "hook": f"transformer.h.1.{site}"}
    formats.save_saelens(sae, tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == ("gpt2", name)
    assert formats.load_saelens(tmp_path).metadata == sae.metadata
    # A folder SAELens itself wrote for a TransformerLens model: its layer and site, no module path.
    write_saelens(tmp_path / "theirs", "standard", {"W_enc": np.ones((3, 5)), "W_dec": np.ones((5, 3)),
                                                   "b_enc": np.zeros(5), "b_dec": np.zeros(3)},
                  metadata={"hook_name": name})
    md = formats.load_saelens(tmp_path / "theirs").metadata
    assert (md["model"], md["layer"], md["site"]) == ("gpt2", 1, site) and "hook" not in md


@pytest.mark.parametrize("alias, hub, layer", [("gpt2-small", "gpt2", 6), ("gemma-2-2b", "google/gemma-2-2b", 12),
                                               ("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped", 3)])
def test_a_saelens_folder_named_by_its_transformerlens_alias_pairs_with_that_models_activations(tmp_path, alias, hub,
                                                                                                layer):
    """SAELens names its registry's models by TransformerLens's aliases: gpt2-small is --model gpt2.
    Its hook_name gives the layer and site, which must match too: layer - 1 is refused."""
    write_saelens(tmp_path, "standard", {"W_enc": np.ones((3, 5)), "W_dec": np.ones((5, 3)), "b_enc": np.zeros(5),
                                         "b_dec": np.zeros(3)},
                  metadata={"model_name": alias, "hook_name": f"blocks.{layer}.hook_resid_post"})
    sae = formats.load_sae(tmp_path)
    manifest = {"d_in": 3, "model": hub, "layer": layer, "site": "resid", "hook": f"model.layers.{layer}"}
    evaluate.check_pairing(sae, manifest, tmp_path, "acts")
    with pytest.raises(ValueError, match=f"was trained on layer {layer} but acts holds layer {layer - 1}; pass the "
                                         "activations it was trained on, or --allow-mismatch"):
        evaluate.check_pairing(sae, {**manifest, "layer": layer - 1}, tmp_path, "acts")
    with pytest.raises(ValueError, match="was trained on model"):
        evaluate.check_pairing(sae, {**manifest, "model": "gpt2-medium"}, tmp_path, "acts")
    evaluate.check_pairing(sae, {**manifest, "layer": layer - 1}, tmp_path, "acts", allow_mismatch=True)


@pytest.mark.parametrize("bos", [1, None])
def test_the_saelens_export_carries_the_context_and_whether_a_bos_comes_first(tmp_path, bos):
    """SAELens's evaluations build their activation store with ActivationsStore.from_sae, which
    requires context_size and prepend_bos: the harvest's context, and whether it put a BOS first."""
    sae = baselines.make_sae("jumprelu", 4, 12)
    sae.metadata = {"model": "smollm2", "layer": 6, "site": "resid", "context": 128, "bos": bos, "separator": 2}
    formats.save_saelens(sae, tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert (meta["context_size"], meta["prepend_bos"], meta["hook_name"]) == (128, bos is not None, "blocks.6.hook_resid_post")
    assert "context" not in meta and formats.load_saelens(tmp_path).metadata == {**sae.metadata,
                                                                               "model": harvest.hub_id("smollm2")}


def test_saelens_reads_the_exports_context_as_its_activation_store_requires(tmp_path):
    """Where sae-lens is installed: the metadata ActivationsStore.from_sae checks before it builds a
    store (sae_lens/training/activations_store.py: hook_name, context_size, prepend_bos) is there."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = baselines.make_sae("jumprelu", 4, 12)
    sae.metadata = {"model": "smollm2", "layer": 6, "site": "resid", "context": 128, "bos": 1}
    formats.save_saelens(sae, tmp_path)
    md = sae_lens.SAE.load_from_disk(str(tmp_path)).cfg.metadata
    assert (md.hook_name, md.context_size, md.prepend_bos) == ("blocks.6.hook_resid_post", 128, True)


# --- Dispatch, the command line, and the rest of the project --------------------------------


def test_load_any_tells_the_layouts_apart(tmp_path):
    p = {"W_enc": np.ones((3, 5)), "W_dec": np.ones((5, 3)), "b_enc": np.zeros(5), "b_dec": np.zeros(3),
         "threshold": np.full(5, 0.5)}
    (tmp_path / "gs").mkdir()
    write_gemma_scope(tmp_path / "gs" / "params.npz", p)
    assert isinstance(formats.load_sae(tmp_path / "gs"), JumpReLUSAE)
    assert isinstance(formats.load_sae(tmp_path / "gs" / "params.npz"), JumpReLUSAE)
    assert isinstance(formats.load_sae(_good_saelens(tmp_path / "sl", "topk")), baselines.TopKSAE)
    sae_folder.save(baselines.make_sae("gated", 3, 5), tmp_path / "ours")
    assert isinstance(formats.load_sae(tmp_path / "ours"), baselines.GatedSAE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="none of the SAE layouts read here: a folder with config.json and "
                                         "sae.safetensors .* params.npz .* cfg.json and sae_weights.safetensors"):
        formats.load_sae(tmp_path / "empty")


def test_command_line_converts_both_ways(tmp_path, capsys):
    p = {"W_enc": np.eye(3, 5), "W_dec": np.eye(5, 3), "b_enc": np.zeros(5), "b_dec": np.zeros(3),
         "threshold": np.full(5, 0.5)}
    write_gemma_scope(tmp_path / "params.npz", p)
    formats.main([str(tmp_path / "params.npz"), "--out", str(tmp_path / "ours")])
    formats.main([str(tmp_path / "ours"), "--out", str(tmp_path / "sl"), "--saelens"])
    out = capsys.readouterr().out
    assert "a jumprelu SAE, d_in 3, d_sae 5" in out and "SAELens's layout" in out
    back = formats.load_sae(tmp_path / "sl")
    assert torch.equal(back.W_enc, torch.eye(3, 5)) and torch.equal(back.threshold, torch.full((5,), 0.5))
    with pytest.raises(SystemExit, match="error: argument src: pass an SAE folder .*, not '.*nowhere'"):
        formats.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="error: argument src: pass an SAE folder .*, not '.*empty'"):
        formats.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="none of the SAE layouts"):          # load_sae itself, for library callers
        formats.load_sae(tmp_path / "empty")


def _source(tmp_path, kind, D, F):
    """A Gemma Scope params.npz or a SAELens folder with random weights, and its reference."""
    g = np.random.default_rng(3)
    w = {"W_enc": g.normal(size=(D, F)) / np.sqrt(D), "W_dec": g.normal(size=(F, D)) / np.sqrt(D),
         "b_dec": g.normal(size=D) * 0.1}
    if kind == "gemma-scope":
        w.update(b_enc=g.normal(size=F) * 0.1, threshold=g.uniform(0.2, 0.6, size=F))
        return write_gemma_scope(tmp_path / "params.npz", w), lambda x: ref_gemma_scope(w, x)
    if kind == "saelens-gated":
        w.update(b_gate=g.normal(size=F) * 0.1, b_mag=g.normal(size=F) * 0.1, r_mag=g.normal(size=F) * 0.1)
        folder = write_saelens(tmp_path / "sl", "gated", w)
    else:
        w.update(b_enc=g.normal(size=F) * 0.1)
        folder = write_saelens(tmp_path / "sl", "standard", w)
    return folder, lambda x: ref_saelens(folder, x)


@pytest.mark.parametrize("kind", ["gemma-scope", "saelens-standard", "saelens-gated"])
def test_imported_saes_run_through_evaluate_and_export(tmp_path, kind):
    D, F = 16, 64
    src, ref = _source(tmp_path, kind, D, F)
    sae = formats.load_sae(src)
    sae_folder.save(sae, tmp_path / "ours")
    ours = formats.load_sae(tmp_path / "ours")
    assert type(ours) is type(sae) and ours.metadata == sae.metadata
    rows = np.random.default_rng(4).normal(size=(300, D)).astype(np.float32)
    m = evaluate.activation_metrics(ours, [(rows, None)], batch_size=128)
    for key, value in evaluate.activation_metrics(sae, [(rows, None)], batch_size=128).items():
        np.testing.assert_array_equal(m[key], value, err_msg=key)       # the saved folder is the same SAE
    f_ref, x_hat_ref = ref(rows.astype(np.float64))
    err = ((rows - x_hat_ref) ** 2).sum(1)
    assert m["tokens"] == 300 and 0 < m["l0"] < F
    assert m["l0"] == pytest.approx((f_ref != 0).sum(1).mean(), abs=0.01)
    assert m["mse"] == pytest.approx(err.mean(), rel=1e-5)
    assert m["fvu"] == pytest.approx(err.sum() / ((rows - rows.mean(0)) ** 2).sum(), rel=1e-5)
    module = export.export(ours, tmp_path / "sae.onnx", what="sae")
    ok, reports, _, tol = export.verify(tmp_path / "sae.onnx", module, ours, rows=200)
    assert ok and reports["random"]["max_rel"] <= tol


def test_evaluate_and_export_scripts_take_a_gemma_scope_file_directly(tmp_path):
    import export
    rng = np.random.default_rng(0)
    d_in, d_sae = 6, 10
    np.savez(tmp_path / "params.npz", W_enc=rng.standard_normal((d_in, d_sae)).astype(np.float32),
             W_dec=rng.standard_normal((d_sae, d_in)).astype(np.float32), b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.5, np.float32))
    assert formats.load_sae(tmp_path / "params.npz").d_sae == d_sae
    export.main([str(tmp_path / "params.npz"), "--out", str(tmp_path / "gs.onnx")])
    assert (tmp_path / "gs.onnx").stat().st_size > 0
