"""Tests for baselines.py: an independent NumPy reference and hypothesis property tests.

The reference below is written from docs/maths.md section 4, not from baselines.py: each
baseline's forward pass and, for ReLU, Gated and TopK (with AuxK), the loss and the gradient of
every parameter derived by hand, so that the two can disagree.

    python -m pytest test_baselines.py                          # quick, deterministic (CI)
    HYPOTHESIS_PROFILE=dev python -m pytest test_baselines.py   # many more examples
"""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

import sae_folder
import train
from baselines import ARCHITECTURES, BatchTopKSAE, GatedSAE, ReLUSAE, TopKSAE, make_sae
from formats import load_sae
from jumprelu import JumpReLUSAE

BASELINES = ("relu", "gated", "topk", "batchtopk")


# --- The NumPy reference (docs/maths.md section 4) -----------------------------------------------------


def ref_relu(x):
    return np.maximum(x, 0.0)


def ref_top_mask(score, k):
    """Per row, True at the k largest entries (no ties at the k-th value assumed)."""
    mask = np.zeros(score.shape, bool)
    np.put_along_axis(mask, np.argsort(-score, axis=1, kind="stable")[:, :k], True, axis=1)
    return mask


def ref_relu_sae(p, x, lam):
    """ReLU SAE: f = ReLU(x W_enc + b_enc); L = mse + lam * mean_b sum_i f_bi ||W_dec,i||."""
    B = x.shape[0]
    pre = x @ p["W_enc"] + p["b_enc"]
    f = ref_relu(pre)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    norms = np.linalg.norm(p["W_dec"], axis=1)
    mse = ((x - x_hat) ** 2).sum(1).mean()
    loss = mse + lam * (f * norms).sum(1).mean()

    d_x_hat = 2.0 * (x_hat - x) / B
    d_pre = (d_x_hat @ p["W_dec"].T + (lam / B) * norms) * (pre > 0)
    grads = {
        # d||w_i||/dw_i = w_i / ||w_i||, weighted by the latent's summed activation
        "W_dec": f.T @ d_x_hat + (lam / B) * f.sum(0)[:, None] * p["W_dec"] / norms[:, None],
        "b_dec": d_x_hat.sum(0),
        "W_enc": x.T @ d_pre,
        "b_enc": d_pre.sum(0),
    }
    return {"pre": pre, "f": f, "x_hat": x_hat, "mse": mse, "loss": loss, "aux": 0.0}, grads


def ref_gated_sae(p, x, lam):
    """Gated SAE: f = H(pi_gate) ReLU(pi_mag);
    L = mse + lam * mean_b sum_i ReLU(pi_gate)_bi ||W_dec,i|| + mean_b ||x_b - x_frozen_b||^2,
    x_frozen = ReLU(pi_gate) W_dec + b_dec with W_dec and b_dec held constant (no gradient)."""
    B = x.shape[0]
    h = x - p["b_dec"]
    e = np.exp(p["r_mag"])
    gate = h @ p["W_enc"] + p["b_gate"]
    mag = h @ (p["W_enc"] * e) + p["b_mag"]
    H, M = gate > 0, mag > 0
    f = np.where(H & M, mag, 0.0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    norms = np.linalg.norm(p["W_dec"], axis=1)
    g = ref_relu(gate)
    x_frozen = g @ p["W_dec"] + p["b_dec"]
    mse = ((x - x_hat) ** 2).sum(1).mean()
    aux = ((x - x_frozen) ** 2).sum(1).mean()
    loss = mse + lam * (g * norms).sum(1).mean() + aux

    d_x_hat = 2.0 * (x_hat - x) / B
    d_mag = (d_x_hat @ p["W_dec"].T) * H * M               # H(pi_gate) passes no gradient to the gate
    d_gate = ((lam / B) * norms + (2.0 * (x_frozen - x) / B) @ p["W_dec"].T) * H
    d_hW = d_gate + d_mag * e                                # both paths read h @ W_enc
    grads = {
        "W_dec": f.T @ d_x_hat + (lam / B) * g.sum(0)[:, None] * p["W_dec"] / norms[:, None],
        "b_dec": d_x_hat.sum(0) - d_hW.sum(0) @ p["W_enc"].T,   # decoder bias + encoder input h = x - b_dec
        "W_enc": h.T @ d_hW,
        "b_gate": d_gate.sum(0),
        "b_mag": d_mag.sum(0),
        "r_mag": (d_mag * (h @ p["W_enc"]) * e).sum(0),
    }
    return {"pre": gate, "mag": mag, "f": f, "x_hat": x_hat, "mse": mse, "aux": aux, "loss": loss}, grads


def ref_auxk(p, x, x_hat, pre, dead):
    """AuxK, normalised as Gao et al.'s code does: e = x - x_hat (a constant), e_hat = f_aux W_dec (no
    bias), f_aux the ReLU of the k_aux = min(d_in // 2, #dead) largest pre-activations among the dead
    latents of each row; aux = sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2, and 0 (with
    f_aux = 0) when k_aux is 0, dead is None or the denominator is 0. Also returns that denominator."""
    k_aux = 0 if dead is None else min(x.shape[1] // 2, int(dead.sum()))
    e = x - x_hat
    e_variance = ((e - e.mean(0)) ** 2).sum()
    k_aux = k_aux if e_variance > 0 else 0
    keep_aux = ref_top_mask(np.where(dead, pre, -np.inf), k_aux) if k_aux else np.zeros(pre.shape, bool)
    f_aux = np.where(keep_aux, ref_relu(pre), 0.0)
    e_hat = f_aux @ p["W_dec"]
    aux = ((e - e_hat) ** 2).sum() / e_variance if k_aux else 0.0
    return keep_aux, f_aux, e, e_hat, aux, e_variance


def ref_variance(x):
    """Var(x) as Gao et al. normalise the MSE by: mean over rows of ||x_b - mean_b(x)||^2."""
    return ((x - x.mean(0)) ** 2).sum(1).mean()


def ref_topk_sae(p, x, k, dead, c):
    """TopK SAE: f = ReLU of the k largest of pre = (x - b_dec) W_enc + b_enc per row;
    L = Var(x) (mse / Var(x) + c AuxK), Gao et al.'s loss in the units of a plain MSE."""
    B = x.shape[0]
    h = x - p["b_dec"]
    pre = h @ p["W_enc"] + p["b_enc"]
    keep = ref_top_mask(pre, k)
    f = np.where(keep, ref_relu(pre), 0.0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    mse = ((x - x_hat) ** 2).sum(1).mean()
    keep_aux, f_aux, e, e_hat, aux, e_variance = ref_auxk(p, x, x_hat, pre, dead)
    var_x = ref_variance(x)

    d_x_hat = 2.0 * (x_hat - x) / B
    d_e_hat = c * var_x * 2.0 * (e_hat - e) / e_variance if aux else np.zeros_like(e)
    d_pre = ((d_x_hat @ p["W_dec"].T) * keep + (d_e_hat @ p["W_dec"].T) * keep_aux) * (pre > 0)
    grads = {
        "W_dec": f.T @ d_x_hat + f_aux.T @ d_e_hat,
        "b_dec": d_x_hat.sum(0) - d_pre.sum(0) @ p["W_enc"].T,   # e uses x_hat as a constant
        "W_enc": h.T @ d_pre,
        "b_enc": d_pre.sum(0),
    }
    return {"pre": pre, "f": f, "x_hat": x_hat, "mse": mse, "aux": aux, "loss": mse + c * var_x * aux}, grads


def ref_batchtopk_train(pre, k):
    """The k * B largest pre-activations of the whole batch, ReLU'd; zero elsewhere."""
    keep = ref_top_mask(pre.reshape(1, -1), k * pre.shape[0]).reshape(pre.shape)
    return np.where(keep, ref_relu(pre), 0.0)


def ref_batchtopk_infer(pre, theta):
    """Inference: pre where pre > theta strictly and pre > 0, else 0."""
    return np.where((pre > theta) & (pre > 0), pre, 0.0)


# --- Small float64 SAEs whose pre-activations are exact in binary ------------------------------

EIGHTHS = st.integers(-16, 16).map(lambda n: n / 8)


@st.composite
def dyadic_case(draw, arch):
    """Parameters (NumPy) and a batch for a small float64 `arch` SAE, plus k, a dead mask and lambda.

    Integer inputs, b_dec in quarters and W_enc and biases in eighths make the pre-activations
    exact in any summation order. Each latent's b_enc also carries its own offset j * 2^-20 (j a
    permutation of the latents), which no sum of 32nds can cancel: no two pre-activations in a row
    tie, so TopK's selection is unique. Decoder rows have norm >= 1/8.
    """
    B, D, F = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 8))
    offsets = np.array(draw(st.permutations(range(F))), dtype=np.float64) * 2.0 ** -20
    p = {
        "W_enc": draw(hnp.arrays(np.float64, (D, F), elements=EIGHTHS)),
        "W_dec": draw(hnp.arrays(np.float64, (F, D), elements=st.one_of(st.floats(-1, -1 / 8), st.floats(1 / 8, 1)))),
        "b_dec": draw(hnp.arrays(np.float64, (D,), elements=st.integers(-8, 8).map(lambda n: n / 4))),
    }
    x = draw(hnp.arrays(np.float64, (B, D), elements=st.integers(-3, 3).map(float)))
    if arch == "gated":
        # Some gates put exactly at 0 on one row (shut: H(0) = 0), whatever pi_mag is there.
        b_gate = draw(hnp.arrays(np.float64, (F,), elements=EIGHTHS))
        at_zero = draw(hnp.arrays(np.bool_, (F,)))
        rows = draw(hnp.arrays(np.int64, (F,), elements=st.integers(0, B - 1)))
        hW = (x - p["b_dec"]) @ p["W_enc"]
        p["b_gate"] = np.where(at_zero, -hW[rows, np.arange(F)], b_gate)
        p["b_mag"] = draw(hnp.arrays(np.float64, (F,), elements=EIGHTHS))
        p["r_mag"] = draw(hnp.arrays(np.float64, (F,), elements=st.one_of(st.just(0.0), st.floats(-2, 2))))
    else:
        p["b_enc"] = draw(hnp.arrays(np.float64, (F,), elements=EIGHTHS)) + offsets
    k = draw(st.integers(1, F))
    dead = draw(st.one_of(st.none(), hnp.arrays(np.bool_, (F,))))
    lam = draw(st.floats(0, 2))
    return p, x, k, dead, lam


def sae_from(arch, p, k=None, device="cpu"):
    D, F = p["W_enc"].shape
    sae = make_sae(arch, D, F, k=k, device=device, dtype=torch.float64)
    with torch.no_grad():
        for name, value in p.items():
            getattr(sae, name).copy_(torch.as_tensor(value))
    return sae


def random_sae(arch, seed, d_in=6, d_sae=20, k=5, dtype=torch.float32):
    """An `arch` SAE with random weights (BatchTopK: threshold 0.3), for tests that need no reference."""
    g = torch.Generator().manual_seed(seed)
    sae = make_sae(arch, d_in, d_sae, k=k, dtype=dtype)
    with torch.no_grad():
        for q in sae.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) * 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
    return sae


def check_grads(sae, ref_grads):
    assert {name for name, _ in sae.named_parameters()} == set(ref_grads)
    for name, ref in ref_grads.items():
        got = getattr(sae, name).grad
        got = np.zeros_like(ref) if got is None else got.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(ref).max(initial=0)),
                                   err_msg=f"gradient of {name}")


def check_out(out, ref, keys):
    for key in keys:
        np.testing.assert_allclose(np.asarray(out[key].detach()), ref[key], rtol=1e-12, atol=1e-12, err_msg=key)


# --- Hand-computed cases ---------------------------------------------------------------------


def test_hand_computed_topk_and_batchtopk():
    # W_enc = I and zero biases: the pre-activations are x itself.
    x = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.125, 0.25, 5.0, -2.0]])
    topk, batch = TopKSAE(4, 4, k=2), BatchTopKSAE(4, 4, k=2)
    for sae in (topk, batch):
        with torch.no_grad():
            sae.W_enc.copy_(torch.eye(4))
    assert topk.encode(x).tolist() == [[3, 0, 2, 0], [0, 0.25, 5, 0]]
    out = batch.loss(x)                                      # the 2 * 2 largest of the batch: 5, 3, 2, 0.5
    assert out["f"].tolist() == [[3, 0, 2, 0.5], [0, 0, 5, 0]]
    assert out["l0"].item() == 2.0 and batch.threshold.item() == 0.5
    assert batch.encode(x).tolist() == [[3, 0, 2, 0], [0, 0, 5, 0]]   # 0.5 is not > 0.5


def test_hand_computed_gated():
    sae = GatedSAE(2, 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([-1.0, 0.0]))
        sae.b_mag.copy_(torch.tensor([0.5, -3.0]))
        sae.r_mag.copy_(torch.tensor([math.log(2.0), 0.0]))
    # pi_gate = [2 - 1, 1] = [1, 1]: both open; pi_mag = [2*2 + 0.5, 1 - 3] = [4.5, -2] -> ReLU.
    f = sae.encode(torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(f, torch.tensor([[4.5, 0.0]]))
    # pi_gate = [0.5 - 1, 1] = [-0.5, 1]: the first gate is shut although pi_mag = 1.5 > 0.
    torch.testing.assert_close(sae.encode(torch.tensor([[0.5, 4.0]])), torch.tensor([[0.0, 1.0]]))


# --- Each baseline against the reference -------------------------------------------------------


@given(case=dyadic_case("relu"))
def test_relu_forward_loss_and_every_gradient(case):
    p, x, _, _, lam = case
    sae = sae_from("relu", p)
    ref, ref_grads = ref_relu_sae(p, x, lam)
    x_t = torch.tensor(x)
    np.testing.assert_array_equal(sae.encode(x_t).detach().numpy(), ref["f"])
    np.testing.assert_allclose(sae(x_t).detach().numpy(), ref["x_hat"], rtol=1e-12, atol=1e-12)
    out = sae.loss(x_t, lam)
    np.testing.assert_array_equal(out["f"].detach().numpy(), ref["f"])
    check_out(out, ref, ("x_hat", "mse", "loss", "aux"))
    assert out["l0"].item() == (ref["f"] != 0).sum(1).mean()
    out["loss"].backward()
    check_grads(sae, ref_grads)


@given(case=dyadic_case("gated"))
def test_gated_forward_loss_and_every_gradient(case):
    p, x, _, _, lam = case
    ref, ref_grads = ref_gated_sae(p, x, lam)
    # pi_gate is exact; pi_mag goes through exp(r_mag): keep it off +-1e-9 so rounding cannot flip its sign.
    assume(not np.any((np.abs(ref["mag"]) < 1e-9) & (ref["mag"] != 0)))
    sae = sae_from("gated", p)
    x_t = torch.tensor(x)
    np.testing.assert_array_equal(sae.pre_acts(x_t).detach().numpy(), ref["pre"])
    np.testing.assert_allclose(sae.encode(x_t).detach().numpy(), ref["f"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sae(x_t).detach().numpy(), ref["x_hat"], rtol=1e-12, atol=1e-12)
    out = sae.loss(x_t, lam)
    check_out(out, ref, ("f", "x_hat", "mse", "aux", "loss"))
    assert out["l0"].item() == (ref["f"] != 0).sum(1).mean()
    out["loss"].backward()
    check_grads(sae, ref_grads)


@given(case=dyadic_case("gated"))
def test_gated_auxiliary_loss_leaves_the_decoder_frozen(case):
    p, x, _, _, _ = case
    sae = sae_from("gated", p)
    aux = sae.loss(torch.tensor(x), 0.0)["aux"]
    g_W_dec, g_b_dec, g_b_gate = torch.autograd.grad(aux, (sae.W_dec, sae.b_dec, sae.b_gate), allow_unused=True)
    assert g_W_dec is None or not g_W_dec.any()
    # b_dec's only path in aux is the encoder input x - b_dec: its gradient is -(d aux / d pi_gate) summed, @ W_enc^T.
    torch.testing.assert_close(g_b_dec, -(g_b_gate @ sae.W_enc.T), rtol=1e-10, atol=1e-12)


@given(case=dyadic_case("topk"), c=st.sampled_from([1 / 32, 1.0, 0.5]))
def test_topk_forward_loss_auxk_and_every_gradient(case, c):
    p, x, k, dead, _ = case
    sae = sae_from("topk", p, k)
    ref, ref_grads = ref_topk_sae(p, x, k, dead, c)
    x_t = torch.tensor(x)
    np.testing.assert_array_equal(sae.encode(x_t).detach().numpy(), ref["f"])
    np.testing.assert_allclose(sae(x_t).detach().numpy(), ref["x_hat"], rtol=1e-12, atol=1e-12)
    out = sae.loss(x_t, dead_F=None if dead is None else torch.tensor(dead), aux_coefficient=c)
    np.testing.assert_array_equal(out["f"].detach().numpy(), ref["f"])
    check_out(out, ref, ("x_hat", "mse", "aux", "loss"))
    out["loss"].backward()
    check_grads(sae, ref_grads)


@given(case=dyadic_case("batchtopk"))
def test_batchtopk_training_selection_and_loss(case):
    p, x, k, dead, _ = case
    sae = sae_from("batchtopk", p, k)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    s = np.sort(pre.ravel())[::-1]
    assume(k * len(x) == s.size or s[k * len(x) - 1] > s[k * len(x)])   # a unique batch selection
    f = ref_batchtopk_train(pre, k)
    out = sae.loss(torch.tensor(x), dead_F=None if dead is None else torch.tensor(dead))
    np.testing.assert_array_equal(out["f"].detach().numpy(), f)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    np.testing.assert_allclose(out["x_hat"].detach().numpy(), x_hat, rtol=1e-12, atol=1e-12)
    *_, ref_aux, _ = ref_auxk(p, x, x_hat, pre, dead)          # TopK's AuxK, on BatchTopK's x_hat
    np.testing.assert_allclose(out["aux"].item(), ref_aux, rtol=1e-12, atol=1e-12)
    mse = ((x - x_hat) ** 2).sum(1).mean()
    np.testing.assert_allclose(out["loss"].item(), mse + ref_variance(x) * ref_aux / 32, rtol=1e-12, atol=1e-12)
    assert (out["f"] != 0).sum() <= k * len(x)


@given(case=dyadic_case("batchtopk"), where=st.integers(0, 10**6),
       offset=st.sampled_from([0.0, 2.0 ** -21, -(2.0 ** -21), 0.25, -0.25, -5.0]))
def test_batchtopk_inference_threshold(case, where, offset):
    p, x, k, _, _ = case
    sae = sae_from("batchtopk", p, k)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    theta = pre.ravel()[where % pre.size] + offset          # at a pre-activation (must be inactive), or near it
    sae.threshold.fill_(theta)
    x_t = torch.tensor(x)
    f = sae.encode(x_t).detach().numpy()
    np.testing.assert_array_equal(f, ref_batchtopk_infer(pre, theta))
    np.testing.assert_allclose(sae(x_t).detach().numpy(), f @ p["W_dec"] + p["b_dec"], rtol=1e-12, atol=1e-12)
    # Inference has no batch dependence: each row alone gives the same features.
    for b in range(len(x)):
        np.testing.assert_array_equal(sae.encode(x_t[b:b + 1]).detach().numpy(), f[b:b + 1])


# --- Invariants on random float weights ----------------------------------------------------------


@pytest.mark.parametrize("arch", BASELINES)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 16), F=st.integers(1, 40), k=st.integers(1, 40),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_features_are_nonnegative_and_topk_sparse(arch, seed, B, F, k, scale):
    k = min(k, F)
    g = torch.Generator().manual_seed(seed)
    sae = make_sae(arch, 6, F, k=k, dtype=torch.float64)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64))
    x = torch.randn(B, 6, generator=g, dtype=torch.float64) * scale
    out = sae.loss(x, 0.1) if arch in ("relu", "gated") else sae.loss(x, dead_F=torch.rand(F, generator=g) < 0.5)
    f_train, f_infer = out["f"].detach(), sae.encode(x).detach()
    assert (f_train >= 0).all() and (f_infer >= 0).all()
    if arch == "topk":
        assert ((f_infer != 0).sum(1) <= k).all() and torch.equal(f_train, f_infer)
    if arch == "batchtopk":
        assert (f_train != 0).sum() <= k * B
        # The threshold just set is the smallest positive kept activation: at inference every kept
        # latent above it stays, and nothing else can exceed it.
        assert torch.equal(f_infer, torch.where(f_train > sae.threshold, f_train, 0))
    if arch in ("relu", "gated"):
        assert torch.equal(f_train, f_infer)
    assert out["l0"].item() == (f_train != 0).sum(1).double().mean().item()


@given(data=st.data())
def test_gated_is_a_jumprelu_with_threshold_b_mag_minus_exp_r_mag_b_gate(data):
    """pi_gate > 0  <=>  pi_mag > theta := b_mag - exp(r_mag) b_gate; with theta > 0, ReLU(pi_mag) = pi_mag
    wherever the gate is open, so f is the JumpReLU of pi_mag (pre-encoder bias, W_enc exp(r_mag), b_mag)."""
    B, D, F = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 8))
    floats = st.floats(-2, 2)
    W_enc = data.draw(hnp.arrays(np.float64, (D, F), elements=floats))
    b_gate = data.draw(hnp.arrays(np.float64, (F,), elements=floats))
    r_mag = data.draw(hnp.arrays(np.float64, (F,), elements=st.floats(-1, 1)))
    theta = data.draw(hnp.arrays(np.float64, (F,), elements=st.floats(0.01, 2)))
    b_mag = theta + np.exp(r_mag) * b_gate
    b_dec = data.draw(hnp.arrays(np.float64, (D,), elements=floats))
    W_dec = data.draw(hnp.arrays(np.float64, (F, D), elements=floats))
    x = data.draw(hnp.arrays(np.float64, (B, D), elements=st.floats(-3, 3)))
    gated = sae_from("gated", dict(W_enc=W_enc, b_gate=b_gate, b_mag=b_mag, r_mag=r_mag, W_dec=W_dec, b_dec=b_dec))
    jump = JumpReLUSAE(D, F, pre_encoder_bias=True, dtype=torch.float64)
    with torch.no_grad():
        for name, value in dict(W_enc=W_enc * np.exp(r_mag), b_enc=b_mag, W_dec=W_dec, b_dec=b_dec).items():
            getattr(jump, name).copy_(torch.tensor(value))
        jump.log_threshold.copy_(torch.tensor(np.log(b_mag - np.exp(r_mag) * b_gate)))
    x_t = torch.tensor(x)
    gate = gated.pre_acts(x_t).detach().numpy()
    assume(np.abs(gate).min() > 1e-6)                        # rounding cannot decide a gate
    f_gated, f_jump = gated.encode(x_t).detach(), jump.encode(x_t).detach()
    torch.testing.assert_close(f_gated, f_jump, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(f_gated.numpy() != 0, gate > 0)


@given(case=dyadic_case("gated"))
def test_gated_with_shared_weights_is_relu_of_the_gate(case):
    p, x, _, _, _ = case
    sae = sae_from("gated", {**p, "r_mag": np.zeros_like(p["r_mag"]), "b_mag": p["b_gate"]})
    x_t = torch.tensor(x)
    assert torch.equal(sae.encode(x_t), sae.pre_acts(x_t).relu())


@pytest.mark.parametrize("arch", BASELINES)
def test_leading_dimensions_are_rows(arch):
    torch.manual_seed(3)
    sae = random_sae(arch, 3)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(sae.encode(x), sae.encode(x.reshape(6, 6)).reshape(2, 3, 20))
    out = sae.loss(x, 0.1) if arch in ("relu", "gated") else sae.loss(x)
    assert out["f"].shape == (2, 3, 20) and out["x_hat"].shape == x.shape
    if arch == "batchtopk":
        assert (out["f"] != 0).sum() <= 6 * sae.k


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_takes_a_read_only_float16_shard_or_any_floating_input_in_the_saes_dtype(arch, tmp_path):
    """Activations as harvest.py writes them (read-only float16 memory maps) go into encode as they
    are, without a warning, and give the features of the same rows cast to the SAE's dtype; so do
    float16 and float64 tensors."""
    rows = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float16)
    np.save(tmp_path / "shard.npy", rows)
    shard = np.load(tmp_path / "shard.npy", mmap_mode="r")
    assert not shard.flags.writeable
    for dtype in (torch.float32, torch.float64):
        sae = random_sae(arch, 0, dtype=dtype)
        want = sae.encode(torch.from_numpy(rows).to(dtype))
        assert want.dtype == dtype and (want != 0).any()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(sae.encode(shard), want)
        for given in (torch.float16, torch.float64, torch.float32):
            assert torch.equal(sae.encode(torch.from_numpy(rows).to(given)), want), given


@pytest.mark.parametrize("arch", BASELINES)
def test_loss_on_leading_dimensions_is_the_loss_on_their_rows(arch):
    """Every term of the loss (the L1 penalty, the MSE, TopK's Var(x) and AuxK) averages over all
    rows, however the leading dimensions group them: [2, 3, d_in] gives the loss of its 6 rows, and
    the fired latents [d_sae] of those rows (it was [3, d_sae])."""
    sae = random_sae(arch, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dead_F = torch.ones(20, dtype=torch.bool)                 # every latent dead: AuxK is not 0
    args = (0.1, None) if arch in ("relu", "gated") else (None, dead_F)
    out, flat = sae.loss(x, *args), sae.loss(x.reshape(6, 6), *args)
    for key in ("loss", "mse", "aux", "l0"):
        torch.testing.assert_close(out[key], flat[key], rtol=1e-12, atol=0, msg=key)
    assert torch.equal(out["fired"], flat["fired"])
    assert (out["aux"] > 0) == (arch in ("gated", "topk", "batchtopk"))


@pytest.mark.parametrize("arch", BASELINES)
def test_loss_reports_the_pre_activations_and_the_latents_that_fired(arch):
    """The loss's "pre" is the encoder's pre-activations (Gated: the gate's), as `pre_acts` gives them;
    its "fired" [d_sae] is True exactly for the latents non-zero on some row (train.py's dead count)."""
    sae = random_sae(arch, 5)
    with torch.no_grad():                                     # latent 0 never fires, latent 1 on every row
        for name in ("b_gate", "b_mag") if arch == "gated" else ("b_enc",):
            getattr(sae, name)[:2] = torch.tensor([-100.0, 100.0])
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(5))
    out = sae.loss(x, 0.1) if arch in ("relu", "gated") else sae.loss(x, dead_F=torch.ones(20, dtype=torch.bool))
    assert torch.equal(out["pre"], sae.pre_acts(x))
    assert out["fired"].shape == (20,) and torch.equal(out["fired"], (out["f"] != 0).any(0))
    assert not out["fired"][0] and out["fired"][1] and (out["f"][:, 1] != 0).all()


def test_auxk_reaches_b_dec_only_through_the_encoder():
    """e_hat has no bias, as in Gao et al.'s paper (their code decodes it with a live bias, which also
    pulls b_dec; docs/maths.md section 4): AuxK's gradient on b_dec is the encoder input's alone,
    -(d AuxK / d b_enc) @ W_enc^T."""
    torch.manual_seed(0)
    sae = make_sae("topk", 8, 32, k=2, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8) * 0.3)
    aux = sae.loss(torch.randn(64, 8, dtype=torch.float64), dead_F=torch.ones(32, dtype=torch.bool))["aux"]
    g_b_dec, g_b_enc = torch.autograd.grad(aux, (sae.b_dec, sae.b_enc))
    assert aux > 0 and g_b_enc.abs().max() > 0
    torch.testing.assert_close(g_b_dec, -(g_b_enc @ sae.W_enc.T), rtol=1e-10, atol=1e-12)


def test_auxk_is_zero_without_dead_latents_and_positive_with_them():
    torch.manual_seed(0)
    sae, x = TopKSAE(8, 32, k=2), torch.randn(16, 8)
    assert sae.loss(x)["aux"].item() == 0.0
    assert sae.loss(x, dead_F=torch.zeros(32, dtype=torch.bool))["aux"].item() == 0.0
    out = sae.loss(x, dead_F=torch.ones(32, dtype=torch.bool))
    assert out["aux"].item() > 0
    var_x = (x - x.mean(0)).pow(2).sum(1).mean()
    torch.testing.assert_close(out["loss"], out["mse"] + var_x * out["aux"] / 32)
    # Gao et al.'s normalisation: with no dead latent firing (all pre-activations below 0), e_hat = 0
    # and AuxK is ||e||^2 / ||e - mean(e)||^2, at least 1; one row has no variance to normalise by.
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    out = sae.loss(x, dead_F=torch.ones(32, dtype=torch.bool))
    e = x - out["x_hat"]
    torch.testing.assert_close(out["aux"], e.pow(2).sum() / (e - e.mean(0)).pow(2).sum())
    assert sae.loss(x[:1], dead_F=torch.ones(32, dtype=torch.bool))["aux"].item() == 0.0
    with pytest.raises(ValueError, match="dead_F must be a bool tensor of shape"):
        sae.loss(x, dead_F=torch.ones(31, dtype=torch.bool))


def test_hand_computed_auxk_on_a_residual_of_small_variance():
    """AuxK is ||e - e_hat||^2 / ||e - mean(e)||^2 however small that variance (here 1/32); only a
    residual with no variance at all gives 0."""
    sae = TopKSAE(2, 2, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))                        # the pre-activations are x itself
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    x = torch.tensor([[0.5, 0.25], [0.25, 0.0]])
    out = sae.loss(x, dead_F=torch.tensor([False, True]))    # k_aux = min(2 // 2, 1) = 1
    # f = [[0.5, 0], [0.25, 0]], e = x - x_hat = [[0, 0.25], [0, 0]], ||e - mean(e)||^2 = 2/64;
    # latent 1 alone is dead: f_aux = [[0, 0.25], [0, 0]], e_hat = [[0, 0.125], [0, 0]], ||e - e_hat||^2 = 1/64.
    assert out["f"].tolist() == [[0.5, 0.0], [0.25, 0.0]]
    assert out["aux"].item() == 0.5
    assert out["mse"].item() == 1 / 32 and out["loss"].item() == 1 / 32 + (1 / 32) * 0.5 / 32   # Var(x) = 1/32


# --- The BatchTopK threshold ---------------------------------------------------------------------


def test_batchtopk_threshold_update():
    torch.manual_seed(0)
    sae = BatchTopKSAE(8, 32, k=3)
    assert sae.threshold.item() == -1.0                      # not estimated yet
    x1, x2 = torch.randn(16, 8), torch.randn(16, 8)
    f1 = sae.loss(x1)["f"]
    first = f1[f1 > 0].min()
    assert sae.threshold.item() == first.item()
    f2 = sae.loss(x2)["f"]
    second = f2[f2 > 0].min()
    torch.testing.assert_close(sae.threshold, 0.99 * first + 0.01 * second, rtol=1e-6, atol=0)
    before = sae.threshold.clone()
    sae.loss(torch.randn(16, 8), update_threshold=False)
    assert torch.equal(sae.threshold, before)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)                                 # nothing positive is kept: no update
    assert not sae.loss(x1)["f"].any() and torch.equal(sae.threshold, before)


@pytest.mark.parametrize("before, want", [(-1.0, 0.3), (0.0, 0.01 * 0.3), (0.5, 0.99 * 0.5 + 0.01 * 0.3),
                                          (2.0, 0.99 * 2.0 + 0.01 * 0.3)])
def test_batchtopk_threshold_update_by_hand(before, want):
    """-1 (not estimated) takes the smallest kept activation; any threshold of 0 or more, below 1 too,
    moves 1% of the way to it. A bf16 batch (autocast) updates the float32 threshold in float32."""
    sae = BatchTopKSAE(4, 4, k=2)
    for dtype in (torch.float32, torch.bfloat16):
        sae.threshold.fill_(before)
        sae.update_threshold_(torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.9, 0.0, 0.0, 0.4]], dtype=dtype))
        kept = torch.tensor(0.3, dtype=dtype).float()           # bf16's 0.3 is 0.30078125
        t = torch.tensor(before)
        assert sae.threshold.dtype == torch.float32
        assert torch.equal(sae.threshold, kept if before < 0 else 0.99 * t + 0.01 * kept), (dtype, before)
        assert sae.threshold.item() == pytest.approx(want, rel=3e-3)


def test_batchtopk_threshold_calibrated_from_the_trained_weights():
    """Bussmann et al.: the threshold is the mean over batches of the smallest positive activation
    that the training forward (k * B largest of the batch) keeps; the running estimate is replaced."""
    sae = BatchTopKSAE(4, 4, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))                        # the pre-activations are x itself
        sae.threshold.fill_(9.0)
    batch1 = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.25, 0.125, 5.0, -2.0]])    # keeps 5 and 3: min 3
    batch2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, -1.0]])        # keeps 1 and 0.5: min 0.5
    nothing = torch.full((2, 4), -1.0)                                           # keeps nothing positive: skipped
    assert sae.calibrate_threshold_([batch1, batch2, nothing]) == 1.75 and sae.threshold.item() == 1.75
    assert sae.encode(batch1).count_nonzero() == 3                             # 3, 2 and 5 are above 1.75
    assert sae.calibrate_threshold_([nothing]) == 1.75                          # none left: unchanged


def test_batchtopk_bf16_sae_compares_against_its_float32_threshold():
    """A bf16 SAE keeps its threshold in float32 and compares each pre-activation with it exactly:
    0.999 rounds to 1 in bf16, yet a pre-activation of 1 is above it and fires."""
    sae = BatchTopKSAE(2, 2, k=1, dtype=torch.bfloat16)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))                        # the pre-activations are x itself
        sae.threshold.fill_(0.999)
    assert sae.threshold.dtype == torch.float32
    f = sae.encode(torch.tensor([[1.0, 0.5], [0.998, 2.0]], dtype=torch.bfloat16))
    assert f.dtype == torch.bfloat16 and f.tolist() == [[1.0, 0.0], [0.0, 2.0]]   # bf16(0.998) = 1 too


# --- Initialisation, construction by name, the decoder constraint --------------------------------


@pytest.mark.parametrize("arch", BASELINES)
def test_initialisation_and_parameter_names(arch):
    torch.manual_seed(0)
    sae = make_sae(arch, 16, 64, k=8)
    torch.manual_seed(0)
    jump = JumpReLUSAE(16, 64)
    assert sae.architecture == arch and type(sae) is ARCHITECTURES[arch]
    assert torch.equal(sae.W_dec, jump.W_dec)                 # same seed, same decoder as JumpReLUSAE
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    biases = ("b_gate", "b_mag", "r_mag") if arch == "gated" else ("b_enc",)
    shapes = {"W_enc": (16, 64), "W_dec": (64, 16), "b_dec": (16,), **{b: (64,) for b in biases}}
    assert {name: tuple(q.shape) for name, q in sae.named_parameters()} == shapes
    assert not sae.b_dec.any() and not any(getattr(sae, b).any() for b in biases)
    assert sae.metadata == {}
    if arch in ("topk", "batchtopk"):
        assert sae.k == 8
    if arch == "batchtopk":
        assert sae.threshold.shape == () and sae.threshold.dtype == torch.float32 and sae.threshold.item() == -1


@pytest.mark.parametrize("arch", BASELINES)
def test_every_tensor_is_made_or_loaded_on_the_requested_device(tmp_path, arch):
    """`device` places every parameter and buffer (BatchTopK's threshold too), in `make_sae` and in
    `load`; "meta" stands in for a GPU."""
    folder = sae_folder.save(make_sae(arch, 4, 8, k=2), tmp_path)
    for sae in (make_sae(arch, 4, 8, k=2, device="meta"), sae_folder.load(folder, device="meta")):
        assert {n: t.device.type for n, t in sae.state_dict().items()} == dict.fromkeys(sae.state_dict(), "meta")


@pytest.mark.parametrize("arch", BASELINES)
def test_a_width_below_one_is_refused(arch):
    """d_in and d_sae must each be at least 1: either one at 0 is a ValueError, not an empty SAE."""
    for d_in, d_sae in ((0, 8), (4, 0)):
        with pytest.raises(ValueError, match="d_in and d_sae must be positive"):
            make_sae(arch, d_in, d_sae, k=1)


def test_make_sae_errors_and_passthrough():
    with pytest.raises(ValueError, match="Unknown SAE architecture 'vanilla'; choose one of jumprelu, relu, gated"):
        make_sae("vanilla", 4, 8)
    for arch in ("topk", "batchtopk"):
        with pytest.raises(ValueError, match="needs k"):
            make_sae(arch, 4, 8)
        for bad in (0, 9, -1, 2.5, True):
            with pytest.raises(ValueError, match="k must be a whole number from 1 to d_sae=8"):
                make_sae(arch, 4, 8, k=bad)
    assert make_sae("jumprelu", 4, 8, bandwidth=0.05).bandwidth == 0.05
    assert make_sae("relu", 4, 8, k=3).architecture == "relu"         # k is ignored where it has no meaning
    assert make_sae("topk", 4, 8, k=np.int64(3)).k == 3


@pytest.mark.parametrize("arch", ["gated", "topk", "batchtopk"])
def test_decoder_projection_and_renormalisation(arch):
    torch.manual_seed(1)
    sae = make_sae(arch, 6, 10, k=3, dtype=torch.float64)
    x = torch.randn(32, 6, dtype=torch.float64)
    out = sae.loss(x, 0.1) if arch == "gated" else sae.loss(x, dead_F=torch.ones(10, dtype=torch.bool))
    out["loss"].backward()
    g_before = sae.W_dec.grad.clone()
    assert ((g_before * sae.W_dec).sum(1).abs() > 1e-8).any()            # there was a parallel part to remove
    sae.remove_parallel_decoder_grad_()
    g = sae.W_dec.grad
    torch.testing.assert_close((g * sae.W_dec).sum(1), torch.zeros(10, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g_before - g, (g_before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(10, 1, dtype=torch.float64) + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_relu_decoder_constraint_is_a_no_op():
    torch.manual_seed(1)
    sae = ReLUSAE(6, 10)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(10, 1) + 0.5)
    sae.loss(torch.randn(32, 6), 0.1)["loss"].backward()
    W, g = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad_()
    sae.normalize_decoder_()
    assert torch.equal(sae.W_dec, W) and torch.equal(sae.W_dec.grad, g)


@pytest.mark.parametrize("arch", BASELINES)
def test_bf16_autocast_agrees_with_float32_and_keeps_the_threshold_float32(arch):
    """Under bf16 autocast (unit roundoff u = 2^-8) the loss is within 4u of float32's, and every gradient
    within 4u (ReLU, Gated) or 16u (TopK, BatchTopK: rounding can swap a row's k-th latent), relatively."""
    torch.manual_seed(2)
    sae = make_sae(arch, 16, 64, k=4)
    x, dead_F, u = torch.randn(128, 16), torch.arange(64) < 32, 2.0**-8
    results = []
    for enabled in (False, True):
        copy_ = copy.deepcopy(sae)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=enabled):
            out = copy_.loss(x, 1e-3, dead_F)
        out["loss"].backward()
        results.append((out, copy_))
    (out32, sae32), (out16, sae16) = results
    assert out16["l0"].dtype == torch.float32 and abs(out16["loss"].item() / out32["loss"].item() - 1) <= 4 * u
    bound = (16 if arch in ("topk", "batchtopk") else 4) * u
    for (name, p16), p32 in zip(sae16.named_parameters(), sae32.parameters()):
        assert p16.grad.dtype == torch.float32
        assert (p16.grad - p32.grad).norm() <= bound * p32.grad.norm(), name
    if arch == "batchtopk":
        assert sae16.threshold.dtype == torch.float32 and sae16.threshold.item() > 0


# --- The input scale, save and load -----------------------------------------------------------------


@pytest.mark.parametrize("arch", BASELINES)
@given(seed=st.integers(0, 2**31), scale=st.floats(1e-2, 1e2))
def test_folded_scale_gives_same_features_on_raw_inputs(arch, seed, scale):
    sae = random_sae(arch, seed, dtype=torch.float64)
    x_raw = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / scale
    with torch.no_grad():
        f_scaled, x_hat_scaled = sae.encode(x_raw * scale), sae(x_raw * scale)
        kept = {n: q.clone() for n, q in [*sae.named_parameters(), *sae.named_buffers()]
                if n not in ("W_enc", "W_dec", "b_dec")}
        sae.fold_input_scale_(scale)
        f_raw, x_hat_raw = sae.encode(x_raw), sae(x_raw)
    assert sae.metadata["input_scale"] == scale
    torch.testing.assert_close(f_raw, f_scaled, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_hat_raw, x_hat_scaled / scale, rtol=1e-9, atol=1e-12)
    for name, value in kept.items():                          # encoder biases, r_mag, threshold untouched
        assert torch.equal(getattr(sae, name), value), name
    sae.fold_input_scale_(2.0)
    assert sae.metadata["input_scale"] == scale * 2.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_fold_rejects_a_bad_scale(bad):
    with pytest.raises(ValueError, match="positive finite"):
        ReLUSAE(4, 8).fold_input_scale_(bad)


@pytest.mark.parametrize("arch", ("jumprelu",) + BASELINES)
@given(seed=st.integers(0, 2**31))
def test_save_then_load_is_exact(tmp_path_factory, arch, seed):
    sae = random_sae(arch, seed) if arch != "jumprelu" else JumpReLUSAE(6, 20)
    sae.metadata.update(model="m", layer=3, site="resid", input_scale=0.25)
    folder = sae_folder.save(sae, tmp_path_factory.mktemp("sae"))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == arch and (cfg.get("k") == 5) == (arch in ("topk", "batchtopk"))
    loaded = load_sae(folder)
    assert type(loaded) is type(sae) and sae_folder.config_of(loaded) == sae_folder.config_of(sae) and loaded.metadata == sae.metadata
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sae.state_dict().values()))
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(seed)) * 2
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    again = sae_folder.save(loaded, tmp_path_factory.mktemp("again"))
    assert (again / "sae.safetensors").read_bytes() == (folder / "sae.safetensors").read_bytes()
    if arch != "jumprelu":
        assert type(sae_folder.load(folder)) is type(sae)


def test_folder_holds_the_named_float32_tensors(tmp_path):
    common = {"W_enc", "W_dec", "b_dec"}
    expected = {"relu": common | {"b_enc"}, "gated": common | {"b_gate", "b_mag", "r_mag"},
                "topk": common | {"b_enc"}, "batchtopk": common | {"b_enc", "threshold"}}
    for arch, names in expected.items():
        sae_folder.save(random_sae(arch, 0, dtype=torch.float64), tmp_path / arch)
        tensors = load_file(str(tmp_path / arch / "sae.safetensors"))
        assert set(tensors) == names and all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("arch", BASELINES)
def test_config_json_holds_the_architecture_shapes_k_dtype_and_metadata(tmp_path, arch):
    """config.json (docs/maths.md section 7) records the architecture, d_in, d_sae, k (TopK and BatchTopK only),
    "dtype": "float32" (the weights' dtype in the file) and the metadata, besides its checksum."""
    sae = random_sae(arch, 0, dtype=torch.float64)
    sae.metadata.update(model="m", layer=3)
    cfg = json.loads((sae_folder.save(sae, tmp_path) / "config.json").read_text())
    assert isinstance(cfg.pop("sha256"), str)
    k = {"k": 5} if arch in ("topk", "batchtopk") else {}
    assert cfg == {"architecture": arch, "d_in": 6, "d_sae": 20, **k, "dtype": "float32", "model": "m", "layer": 3}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_k_of_one_and_of_d_sae_save_and_load(tmp_path, arch):
    """Every k that construction accepts, 1 to d_sae, is saved and read back, by the class and by load_sae."""
    for k in (1, 20):
        folder = sae_folder.save(random_sae(arch, 0, k=k), tmp_path / str(k))
        assert sae_folder.load(folder).k == k and load_sae(folder).k == k


# The edits below also drop config.json's sha256 (if sae_folder.write_folder wrote one), as a folder
# written by another tool would have none: what is tested is sae_folder.load's checks of each architecture.


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes, sha256=None)
    for key in [key for key, value in cfg.items() if value is None]:
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, **changes):
    tensors = load_file(str(folder / "sae.safetensors"))
    tensors.update(changes)
    save_file({k: v for k, v in tensors.items() if v is not None}, str(folder / "sae.safetensors"))
    _edit_config(folder)


@pytest.mark.parametrize("arch, damage, message", [
    ("gated", lambda f: _edit_config(f, architecture="relu"), "has no tensor 'b_enc'"),
    ("gated", lambda f: _edit_tensors(f, r_mag=None), "has no tensor 'r_mag'"),
    ("batchtopk", lambda f: _edit_tensors(f, threshold=None), "has no tensor 'threshold'"),
    ("relu", lambda f: _edit_tensors(f, b_enc=torch.zeros(21)), "b_enc of shape [21], but config.json implies [20]"),
    ("topk", lambda f: _edit_config(f, d_in=7), "W_dec of shape [20, 6], but config.json implies [20, 7]"),
    ("topk", lambda f: _edit_config(f, k=None), "valid 'k'"),
    ("batchtopk", lambda f: _edit_config(f, k=21), "valid 'k'"),
    ("batchtopk", lambda f: _edit_config(f, k="5"), "valid 'k'"),
    ("batchtopk", lambda f: _edit_tensors(f, threshold=torch.tensor(math.nan)), "holds NaN or Inf"),
])
def test_load_rejects_a_bad_folder_in_one_sentence(tmp_path, arch, damage, message):
    folder = sae_folder.save(random_sae(arch, 0), tmp_path)
    damage(folder)
    for load in (sae_folder.load, load_sae):
        with pytest.raises(ValueError) as info:
            load(folder)
        assert message in str(info.value)
        assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


@pytest.mark.parametrize("damage, message", [
    (lambda f: _edit_config(f, architecture="vanilla"), "names architecture 'vanilla', which is none of jumprelu"),
    (lambda f: _edit_config(f, architecture=None), "names architecture None"),
    (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda f: (f / "config.json").unlink(), "has no config.json"),
    (lambda f: (f / "sae.safetensors").unlink(), "has no sae.safetensors"),
])
def test_load_sae_dispatch_errors(tmp_path, damage, message):
    folder = sae_folder.save(random_sae("relu", 0), tmp_path / "sae")
    damage(folder)
    with pytest.raises(ValueError) as info:
        load_sae(folder)
    assert message in str(info.value) and str(info.value).count(". ") == 0
    with pytest.raises(ValueError, match="nowhere does not exist"):
        load_sae(tmp_path / "nowhere")


# --- Training smoke test --------------------------------------------------------------------------


def sparse_data(n, seed, d_in=16, n_true=48, active=3):
    """Rows that are sums of `active` of `n_true` fixed random unit directions, magnitudes in [0.5, 1.5]."""
    dirs_TD = torch.randn(n_true, d_in, generator=torch.Generator().manual_seed(1234))
    dirs_TD /= dirs_TD.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx_NA = torch.rand(n, n_true, generator=g).argsort(1)[:, :active]
    coef_NT = torch.zeros(n, n_true).scatter(1, idx_NA, 0.5 + torch.rand(n, active, generator=g))
    return coef_NT @ dirs_TD


def fvu(x, x_hat):
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@pytest.mark.parametrize("arch", BASELINES)
def test_training_reduces_the_reconstruction_error(arch):
    torch.manual_seed(0)
    x, x_eval = sparse_data(256 * 200, seed=0), sparse_data(2048, seed=1)
    sae = make_sae(arch, 16, 64, k=4)
    with torch.no_grad():                                     # BatchTopK: its training forward, no threshold yet
        start = fvu(x_eval, sae.loss(x_eval, update_threshold=False)["x_hat"] if arch == "batchtopk" else sae(x_eval))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    fired_at = torch.zeros(64, dtype=torch.long)
    for step, x_BD in enumerate(x.split(256)):                # train.py's step: dead after 20 steps unfired
        train.train_step(sae, opt, sae.loss, x_BD, 1e-3, fired_at, step, dead_steps=20)
    with torch.no_grad():
        f = sae.encode(x_eval)
        end = fvu(x_eval, sae.decode(f))                      # inference path (BatchTopK: its threshold)
    print(f"{arch}: FVU {start:.3f} -> {end:.3f}, L0 {(f != 0).sum(1).float().mean():.1f}")
    assert end < 0.5 * start and end < 0.5
    if arch in ("topk", "batchtopk"):
        assert 2 <= (f != 0).sum(1).float().mean() <= 8
