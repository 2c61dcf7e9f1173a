"""Tests for jumprelu.py: an independent NumPy reference and hypothesis property tests.

The reference below is written from ../shared/SPEC.md sections 1-3, not from jumprelu.py:
the forward pass and every pseudo-derivative by hand, so that the two can disagree.

    python -m pytest test_jumprelu.py                          # quick, deterministic (CI)
    HYPOTHESIS_PROFILE=dev python -m pytest test_jumprelu.py   # many more examples
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jumprelu import (JumpReLUSAE, atomic_write, exact_log, folder_digest, jumprelu, read_folder, rectangle,
                      sparse_terms, step)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- The NumPy reference (SPEC sections 1 and 2) ---------------------------------------------


def ref_K(u):
    """Rectangle kernel: 1 on the open interval (-1/2, 1/2), 0 elsewhere (edges included)."""
    return np.where((u > -0.5) & (u < 0.5), 1.0, 0.0).astype(u.dtype)


def ref_H(u):
    """Heaviside: 1 for u > 0 strictly, else 0."""
    return np.where(u > 0, 1.0, 0.0).astype(u.dtype)


def ref_reduce(g, shape):
    """Sum a gradient over the axes along which a tensor of `shape` was broadcast."""
    while g.ndim > len(shape):
        g = g.sum(0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis, keepdims=True)
    return g


def ref_jumprelu(z, theta):
    return z * ref_H(z - theta)


def ref_jumprelu_grads(z, theta, eps, g, ste=False):
    """(d/dz, d/dtheta) of sum(g * jumprelu(z, theta)): H(z - theta) and -(theta/eps) K((z-theta)/eps).
    With the estimator passed on to the input (Anthropic), d/dz gains +(theta/eps) K((z-theta)/eps):
    the estimator of the jump depends on z - theta only."""
    d_z = g * ref_H(z - theta) + (ste * (theta / eps) * ref_K((z - theta) / eps) * g)
    d_theta = -(theta / eps) * ref_K((z - theta) / eps) * g
    return d_z, ref_reduce(d_theta, np.shape(theta))


def ref_step(z, theta):
    return ref_H(z - theta)


def ref_step_grad_theta(z, theta, eps, g):
    """d/dtheta of sum(g * step(z, theta)) = -(1/eps) K((z - theta)/eps) (and d/dz = 0)."""
    return ref_reduce(-(1.0 / eps) * ref_K((z - theta) / eps) * g, np.shape(theta))


def ref_step_grad_z_ste(z, theta, eps, g):
    """d/dz of sum(g * step(z, theta)) with the estimator passed on to the input: +(1/eps) K((z - theta)/eps)."""
    return (1.0 / eps) * ref_K((z - theta) / eps) * g


def ref_sae(p, x, lam, eps, pre_bias, target=None):
    """The SAE forward, loss and the gradient of the loss for every parameter, by hand.

    L = (1/B) sum_b ||x_b - x_hat_b||^2 + lam * (1/B) sum_b S(L0_b),  L0_b = sum_i H(pre_bi - theta_i),
    with S(l) = l (the paper) or, given a target K, S(l) = (2/K)(l - K)^2 (Gemma Scope 2).
    """
    B = x.shape[0]
    theta = np.exp(p["log_threshold"]) if "theta" not in p else p["theta"]
    x_in = x - p["b_dec"] if pre_bias else x
    pre = x_in @ p["W_enc"] + p["b_enc"]
    active = ref_H(pre - theta)
    f = pre * active
    x_hat = f @ p["W_dec"] + p["b_dec"]
    mse = ((x - x_hat) ** 2).sum(1).mean()
    l0_rows = active.sum(1)
    l0 = l0_rows.mean()
    sparsity = l0 if target is None else ((2.0 / target) * (l0_rows - target) ** 2).mean()
    dS_dl0 = np.ones(B) if target is None else (4.0 / target) * (l0_rows - target)   # per row
    kernel = ref_K((pre - theta) / eps)

    d_x_hat = 2.0 * (x_hat - x) / B                        # dL/dx_hat
    d_f = d_x_hat @ p["W_dec"].T                            # dL/df
    d_pre = d_f * active                                    # jumprelu's d/dz; the L0 term adds none
    d_theta = (d_f * -(theta / eps) * kernel).sum(0) + (lam / B) * (dS_dl0[:, None] * -(1.0 / eps) * kernel).sum(0)
    grads = {
        "W_dec": f.T @ d_x_hat,
        "b_dec": d_x_hat.sum(0) - (d_pre.sum(0) @ p["W_enc"].T if pre_bias else 0.0),
        "W_enc": x_in.T @ d_pre,
        "b_enc": d_pre.sum(0),
        "log_threshold": theta * d_theta,                   # chain rule through theta = exp(.)
    }
    return {"pre": pre, "f": f, "x_hat": x_hat, "mse": mse, "l0": l0, "loss": mse + lam * sparsity}, grads


def ref_anthropic_sae(p, x, lam, eps, pre_bias, c, lam_p, dead, ste, target=None, sparsity="tanh"):
    """The SAE with Anthropic's January 2025 terms (SPEC section 3), forward, loss and every gradient:

    L = (1/B) sum_b ||x_b - x_hat_b||^2 + lam * (1/B) sum_b S_b
        + lam_p * (1/B) sum_b sum_{i dead} ReLU(theta_i - pre_bi) ||W_dec,i||,
    S_b = sum_i tanh(c f_bi ||W_dec,i||) (sparsity "tanh"), or L0_b / (2/K)(L0_b - K)^2 as in ref_sae,
    and with `ste` each estimator's gradient also reaches pre (through z - theta).
    """
    B = x.shape[0]
    theta = p["theta"]
    x_in = x - p["b_dec"] if pre_bias else x
    pre = x_in @ p["W_enc"] + p["b_enc"]
    active, kernel = ref_H(pre - theta), ref_K((pre - theta) / eps)
    f = pre * active
    x_hat = f @ p["W_dec"] + p["b_dec"]
    norms = np.linalg.norm(p["W_dec"], axis=1)
    unit = np.divide(p["W_dec"], norms[:, None], out=np.zeros_like(p["W_dec"]), where=norms[:, None] > 0)  # d||w||/dw
    dead = np.zeros(theta.shape, bool) if dead is None else dead
    gap = np.maximum(theta - pre, 0.0) * dead                 # ReLU(theta - pre) on dead latents
    mse = ((x - x_hat) ** 2).sum(1).mean()
    l0_rows = active.sum(1)
    if sparsity == "tanh":
        t = np.tanh(c * f * norms)
        S, d_f_S, dS_dl0 = t.sum(1).mean(), (lam / B) * c * norms * (1 - t ** 2), np.zeros(B)
    else:
        S = l0_rows.mean() if target is None else ((2.0 / target) * (l0_rows - target) ** 2).mean()
        d_f_S, dS_dl0 = 0.0, np.ones(B) if target is None else (4.0 / target) * (l0_rows - target)
    loss = mse + lam * S + lam_p * (gap * norms).sum(1).mean()

    d_x_hat = 2.0 * (x_hat - x) / B
    d_f = d_x_hat @ p["W_dec"].T + d_f_S
    d_step = (lam / B) * dS_dl0[:, None]                     # upstream gradient of each step(pre, theta)
    below = (theta > pre) * dead * norms * (lam_p / B)       # d/dtheta of the pre-activation loss; -d/dpre
    d_pre = d_f * active + ste * (d_f * (theta / eps) + d_step / eps) * kernel - below
    d_theta = (d_f * -(theta / eps) * kernel).sum(0) + (d_step * -(1.0 / eps) * kernel).sum(0) + below.sum(0)
    d_norms = (((lam / B) * c * f * (1 - np.tanh(c * f * norms) ** 2)).sum(0) if sparsity == "tanh" else 0.0) \
        + (lam_p / B) * gap.sum(0)
    grads = {
        "W_dec": f.T @ d_x_hat + d_norms[..., None] * unit,
        "b_dec": d_x_hat.sum(0) - (d_pre.sum(0) @ p["W_enc"].T if pre_bias else 0.0),
        "W_enc": x_in.T @ d_pre,
        "b_enc": d_pre.sum(0),
        "log_threshold": theta * d_theta,
    }
    return {"f": f, "x_hat": x_hat, "mse": mse, "l0": l0_rows.mean(), "loss": loss}, grads


# --- Hand-computed cases (SAELens style) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rectangle_open_interval(dtype):
    """K(u) = 1 on the open interval (-1/2, 1/2), else 0, in the dtype of u."""
    u = torch.tensor([-0.75, -0.5, -0.4999, 0.0, 0.4999, 0.5, 0.75], dtype=dtype)
    assert rectangle(u).dtype == dtype and rectangle(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_hand_computed_window():
    # theta = 0.5, eps = 0.25 (exact in binary): z at the window's edges, inside it, at theta.
    theta = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([0.375, 0.4375, 0.5, 0.5625, 0.625, 1.0], dtype=torch.float64, requires_grad=True)
    out = jumprelu(z, theta, 0.25)
    assert out.tolist() == [0, 0, 0, 0.5625, 0.625, 1.0]          # z = theta is inactive
    out.sum().backward()
    assert z.grad.tolist() == [0, 0, 0, 1, 1, 1]
    assert theta.grad.tolist() == [-(0.5 / 0.25) * 3]              # three z strictly inside the window
    theta.grad = None
    s = step(z, theta, 0.25)
    assert s.tolist() == [0, 0, 0, 1, 1, 1]
    s.sum().backward()
    assert theta.grad.tolist() == [-(1 / 0.25) * 3]


# --- Property tests of the two estimators against the reference --------------------------------

# Offsets, in units of the bandwidth, that put z at theta, at the window's edges, inside it and
# outside it; "raw" means z is drawn on its own, not relative to theta.
OFFSETS = st.one_of(st.sampled_from([0.0, 0.5, -0.5, 0.25, -0.25, 1.0, -1.0]),
                    st.floats(-3, 3, allow_nan=False), st.just(math.nan))


@st.composite
def z_theta_eps(draw, dtype=np.float64):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    theta_shape = draw(st.sampled_from([shape[-1:], (), (1,) * len(shape[:-1]) + shape[-1:]]))
    eps = draw(st.one_of(st.sampled_from([2.0 ** -k for k in range(1, 11)]), st.floats(1e-4, 1.0)))
    theta = draw(hnp.arrays(np.float64, theta_shape, elements=st.one_of(
        st.floats(1e-3, 10.0), st.sampled_from([0.001, 0.5, 1.0, 3.0]))))
    offsets = draw(hnp.arrays(np.float64, shape, elements=OFFSETS))
    raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(-10, 10)))
    z = np.where(np.isnan(offsets), raw, theta + np.nan_to_num(offsets) * eps)
    g = draw(hnp.arrays(np.float64, shape, elements=st.floats(-2, 2)))
    return z.astype(dtype), np.asarray(theta, dtype), eps, g.astype(dtype)


def _torch(a, device, requires_grad=False):
    return torch.tensor(a, device=device, requires_grad=requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(data=st.data())
def test_jumprelu_matches_reference(device, dtype, data):
    z, theta, eps, g = data.draw(z_theta_eps(dtype))
    z_t, theta_t = _torch(z, device, True), _torch(theta, device, True)
    out = jumprelu(z_t, theta_t, eps)
    np.testing.assert_array_equal(out.detach().cpu().numpy(), ref_jumprelu(z, theta))
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, device))
    ref_d_z, ref_d_theta = ref_jumprelu_grads(z, theta, dtype(eps), g)
    assert d_theta.shape == theta_t.shape and d_theta.dtype == theta_t.dtype
    np.testing.assert_array_equal(d_z.cpu().numpy(), ref_d_z)
    rtol, atol = (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-5)
    np.testing.assert_allclose(d_theta.cpu().numpy(), ref_d_theta, rtol=rtol, atol=atol * np.abs(ref_d_theta).max(initial=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(data=st.data())
def test_step_matches_reference(device, dtype, data):
    z, theta, eps, g = data.draw(z_theta_eps(dtype))
    z_t, theta_t = _torch(z, device, True), _torch(theta, device, True)
    out = step(z_t, theta_t, eps)
    np.testing.assert_array_equal(out.detach().cpu().numpy(), ref_step(z, theta))
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, device), allow_unused=True)
    assert d_z is None or not d_z.any()                       # d/dz = 0: the L0 term trains theta only
    ref = ref_step_grad_theta(z, theta, dtype(eps), g)
    rtol, atol = (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-5)
    np.testing.assert_allclose(d_theta.cpu().numpy(), ref, rtol=rtol, atol=atol * np.abs(ref).max(initial=1))


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_estimators_passed_on_to_the_input_match_reference(device, data):
    """Anthropic's estimator change (ste_to_input): the same forward and theta-gradients, and the
    kernel term, with the opposite sign, on z as well."""
    z, theta, eps, g = data.draw(z_theta_eps(np.float64))
    z_t, theta_t = _torch(z, device, True), _torch(theta, device, True)
    out = jumprelu(z_t, theta_t, eps, ste_to_input=True)
    np.testing.assert_array_equal(out.detach().cpu().numpy(), ref_jumprelu(z, theta))
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, device))
    ref_d_z, ref_d_theta = ref_jumprelu_grads(z, theta, eps, g, ste=True)
    np.testing.assert_allclose(d_z.cpu().numpy(), ref_d_z, rtol=1e-12, atol=1e-12 * np.abs(ref_d_z).max(initial=1))
    np.testing.assert_allclose(d_theta.cpu().numpy(), ref_d_theta, rtol=1e-12, atol=1e-12 * np.abs(ref_d_theta).max(initial=1))
    out = step(z_t, theta_t, eps, ste_to_input=True)
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, device))
    ref = ref_step_grad_z_ste(z, theta, eps, g)
    np.testing.assert_allclose(d_z.cpu().numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max(initial=1))
    ref = ref_step_grad_theta(z, theta, eps, g)
    np.testing.assert_allclose(d_theta.cpu().numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max(initial=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16])
@given(data=st.data())
def test_low_precision_z_with_float32_theta(device, z_dtype, data):
    """bf16/fp16 pre-activations (autocast) against float32 thresholds: exact forward, float32 theta-grad."""
    z, theta, eps, g = data.draw(z_theta_eps(np.float32))
    z_t = torch.tensor(z).to(z_dtype).to(device).requires_grad_()
    theta_t = _torch(theta, device, True)
    z_seen = z_t.detach().float().cpu().numpy()               # the values after rounding to z_dtype
    out = jumprelu(z_t, theta_t, eps)
    assert out.dtype == z_dtype
    np.testing.assert_array_equal(out.detach().float().cpu().numpy(), ref_jumprelu(z_seen, theta))
    g_t = torch.tensor(g).to(z_dtype).to(device)
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), g_t)
    assert d_theta.dtype == torch.float32 and d_z.dtype == z_dtype
    _, ref = ref_jumprelu_grads(z_seen, theta, np.float32(eps), g_t.float().cpu().numpy())
    np.testing.assert_allclose(d_theta.cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(initial=1))
    s = step(z_t, theta_t, eps)
    assert s.dtype == torch.float32
    np.testing.assert_array_equal(s.detach().cpu().numpy(), ref_step(z_seen, theta))


@given(data=st.data())
def test_float64_z_with_float32_theta_works_in_float64(data):
    """The common dtype is the wider one either way round: float64 pre-activations against float32
    thresholds give the float64 reference's gradients on z (the estimators' terms included), and
    float32 theta-gradients."""
    z, theta, eps, g = data.draw(z_theta_eps(np.float64))
    theta = theta.astype(np.float32)
    z_t, theta_t = _torch(z, "cpu", True), _torch(theta, "cpu", True)
    theta_64 = theta.astype(np.float64)                       # the float32 values, exactly
    refs = {jumprelu: ref_jumprelu_grads(z, theta_64, eps, g, ste=True)[0],
            step: ref_step_grad_z_ste(z, theta_64, eps, g)}
    for estimator, ref_d_z in refs.items():
        out = estimator(z_t, theta_t, eps, ste_to_input=True)
        d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, "cpu"))
        assert d_z.dtype == torch.float64 and d_theta.dtype == torch.float32
        np.testing.assert_allclose(d_z.numpy(), ref_d_z, rtol=1e-12, atol=1e-12 * np.abs(ref_d_z).max(initial=1))


# --- The SAE against the reference ------------------------------------------------------------


@st.composite
def dyadic_sae(draw, pre_bias=None):
    """A small float64 SAE and batch whose pre-activations are exact in binary.

    Integer inputs and weights in eighths make x @ W_enc + b_enc exact in any summation order,
    so thresholds placed at a pre-activation, at the window's edges or inside the window give
    the same H and K in PyTorch and in NumPy.
    """
    B, D, F = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 8))
    eighths = st.integers(-16, 16).map(lambda k: k / 8)
    x = draw(hnp.arrays(np.float64, (B, D), elements=st.integers(-3, 3).map(float)))
    W_enc = draw(hnp.arrays(np.float64, (D, F), elements=eighths))
    b_enc = draw(hnp.arrays(np.float64, (F,), elements=eighths))
    # decoder entries 0 or of magnitude >= 2^-30: below ~1e-154 a row norm's square underflows, and
    # torch and NumPy then differ on d||w||/dw (found: a row of 8e-199 in the tanh penalty)
    W_dec = draw(hnp.arrays(np.float64, (F, D), elements=st.one_of(
        st.just(0.0), st.floats(2.0 ** -30, 1), st.floats(-1, -(2.0 ** -30)))))
    b_dec = draw(hnp.arrays(np.float64, (D,), elements=st.integers(-8, 8).map(lambda k: k / 4)))
    pre_bias = draw(st.booleans()) if pre_bias is None else pre_bias
    eps = 2.0 ** -draw(st.integers(1, 4))
    x_in = x - b_dec if pre_bias else x
    pre = x_in @ W_enc + b_enc
    rows = draw(hnp.arrays(np.int64, (F,), elements=st.integers(0, B - 1)))
    offsets = draw(hnp.arrays(np.float64, (F,), elements=st.sampled_from([0, 0.5, -0.5, 0.25, -0.25, 0.375, 3])))
    theta = pre[rows, np.arange(F)] + offsets * eps
    theta = np.where(theta > 0, theta, draw(st.sampled_from([1 / 16, 0.5, 2.0])))
    lam = draw(st.floats(0, 2))
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, theta=theta), x, lam, eps, pre_bias


def _sae_from(p, eps, pre_bias, device="cpu", dtype=torch.float64):
    D, F = p["W_enc"].shape
    sae = JumpReLUSAE(D, F, bandwidth=eps, pre_encoder_bias=pre_bias, device=device, dtype=dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.tensor(p[name]))
        sae.log_threshold.copy_(torch.tensor(np.log(p["theta"])))
    return sae


def _sparsity(target):
    """The loss's sparsity options: the paper's L0, or Gemma Scope 2's quadratic per row around target."""
    return {"sparsity": "l0"} if target is None else {"sparsity": "target_row", "target_l0": target}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@given(case=dyadic_sae(), target=st.one_of(st.none(), st.integers(1, 6)))
def test_sae_forward_loss_and_every_gradient(device, sparse, case, target):
    """Both paths against the reference; the thresholds sit at pre-activations, at the window's
    edges and inside it, so the sparse path must keep the in-window entries below theta too."""
    p, x, lam, eps, pre_bias = case
    sae = _sae_from(p, eps, pre_bias, device)
    # The reference uses the thresholds the model actually holds (exp of a float64 log).
    p = {**p, "theta": sae.threshold.detach().cpu().numpy()}
    ref, ref_grads = ref_sae(p, x, lam, eps, pre_bias, target)
    out = sae.loss(torch.tensor(x, device=device), lam, **_sparsity(target), sparse=sparse)
    if not sparse:
        np.testing.assert_array_equal(out["f"].detach().cpu().numpy(), ref["f"])
    np.testing.assert_array_equal(out["fired"].cpu().numpy(), (ref["f"] != 0).any(0))
    for key in ("x_hat", "mse", "l0", "loss"):
        np.testing.assert_allclose(out[key].detach().cpu().numpy(), ref[key], rtol=1e-12, atol=1e-12)
    out["loss"].backward()
    for name, ref_grad in ref_grads.items():
        got = getattr(sae, name).grad.cpu().numpy()
        np.testing.assert_allclose(got, ref_grad, rtol=1e-10, atol=1e-10 * max(1, np.abs(ref_grad).max()),
                                   err_msg=f"gradient of {name}")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@given(case=dyadic_sae(), data=st.data())
def test_anthropic_terms_against_the_reference(sparse, case, data):
    """Anthropic's tanh penalty (scale c), the pre-activation loss on dead latents and the estimator
    passed on to the input, each on or off, against ref_anthropic_sae; the dense path takes them all,
    the sparse path the estimator change with the paper's and Gemma Scope 2's penalties."""
    p, x, lam, eps, pre_bias = case
    F = p["theta"].size
    sparsity = data.draw(st.sampled_from(["l0", "target_row"] if sparse else ["tanh", "tanh", "l0", "target_row"]))
    c = data.draw(st.sampled_from([0.5, 4.0, 96.0]))
    lam_p = 0.0 if sparse else data.draw(st.sampled_from([0.0, 0.25, 3.0]))
    dead = data.draw(st.one_of(st.none(), hnp.arrays(np.bool_, (F,))))
    ste, target = data.draw(st.booleans()), data.draw(st.integers(1, 6)) if sparsity == "target_row" else None
    sae = _sae_from(p, eps, pre_bias)
    p = {**p, "theta": sae.threshold.detach().numpy()}
    ref, ref_grads = ref_anthropic_sae(p, x, lam, eps, pre_bias, c, lam_p, dead, ste, target, sparsity)
    out = sae.loss(torch.tensor(x), lam, None if dead is None else torch.tensor(dead), sparsity=sparsity,
                   target_l0=target, tanh_scale=c, pre_act_coefficient=lam_p, ste_to_input=ste, sparse=sparse)
    for key in ("x_hat", "mse", "l0", "loss"):
        np.testing.assert_allclose(out[key].detach().numpy(), ref[key], rtol=1e-12, atol=1e-12, err_msg=key)
    out["loss"].backward()
    for name, ref_grad in ref_grads.items():
        np.testing.assert_allclose(getattr(sae, name).grad.numpy(), ref_grad, rtol=1e-10,
                                   atol=1e-10 * max(1, np.abs(ref_grad).max()), err_msg=f"gradient of {name}")


def test_anthropic_hand_computed_case():
    """One latent, one row, numbers by hand: pre = 0.75 against theta = 0.5 (eps 0.5, so pre is at the
    window's edge and outside it), c = 2, ||W_dec|| = 1; then a dead latent below its threshold."""
    sae = JumpReLUSAE(1, 1, bandwidth=0.5, threshold_init=0.5, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.fill_(1.0), sae.W_dec.fill_(1.0)
    x = torch.tensor([[0.75]], dtype=torch.float64)
    out = sae.loss(x, 0.1, sparsity="tanh", tanh_scale=2.0)
    # f = 0.75, x_hat = 0.75: mse 0; penalty 0.1 * tanh(2 * 0.75 * 1)
    assert out["loss"].item() == pytest.approx(0.1 * math.tanh(1.5))
    out["loss"].backward()
    # d/db_enc = d/df = 0.1 * 2 * (1 - tanh(1.5)^2); the jump is outside the window: no theta gradient
    assert sae.b_enc.grad.item() == pytest.approx(0.2 * (1 - math.tanh(1.5) ** 2))
    assert sae.log_threshold.grad.item() == 0.0
    sae.zero_grad()
    x = torch.tensor([[0.25]], dtype=torch.float64)                  # below theta: f = 0, x_hat = 0
    out = sae.loss(x, 0.0, torch.tensor([True]), sparsity="tanh", pre_act_coefficient=3.0, ste_to_input=True)
    # mse 0.25^2; pre-activation loss 3 * ReLU(0.5 - 0.25) * 1 = 0.75
    assert out["loss"].item() == pytest.approx(0.0625 + 0.75)
    out["loss"].backward()
    # pre = 0.25 is inside the window (|0.25 - 0.5| / 0.5 = 0.5 is its edge: not inside), so only the
    # pre-activation loss: d/dpre = -3, d/dtheta = +3 (d/dlog theta = 0.5 * 3)
    assert sae.b_enc.grad.item() == pytest.approx(-3.0) and sae.log_threshold.grad.item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="use the dense path"):
        sae.loss(x, 0.1, sparsity="tanh", sparse=True)


@pytest.mark.parametrize("sparsity, target, penalty", [
    ("l0", None, 1.5),
    ("target_row", 4, 0.5 * ((1 - 4) ** 2 + (2 - 4) ** 2) / 2),
    ("target_batch", 4, 0.5 * (1.5 - 4) ** 2),
    ("tanh", None, (math.tanh(4.0) + math.tanh(8.0) + math.tanh(12.0)) / 2),
])
def test_each_sparsity_penalty_by_hand(sparsity, target, penalty):
    """Two rows through an identity SAE with theta = 0.5: f = [1, 0] and [2, 3], L0 1 and 2. With
    K = 4 (so 2/K = 1/2): target_row averages the rows' (2/K)(L0 - K)^2, target_batch squares the
    mean L0's distance, and tanh uses the default c = 4 on unit decoder rows."""
    sae = JumpReLUSAE(2, 2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)), sae.W_dec.copy_(torch.eye(2)), sae.log_threshold.fill_(math.log(0.5))
    x = torch.tensor([[1.0, 0.25], [2.0, 3.0]], dtype=torch.float64)
    out = sae.loss(x, 0.5, sparsity=sparsity, target_l0=target)
    assert out["l0"].item() == 1.5 and out["mse"].item() == 0.25**2 / 2       # x_hat = f
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.5 * penalty, rel=1e-12)


def test_dense_loss_takes_any_leading_dimensions():
    """The dense path takes x of shape [..., d_in]: a [2, 3, d_in] batch gives the loss, MSE, L0 and
    fired latents of its 6 rows, with the tanh penalty and the pre-activation loss as well."""
    sae, x_BD = _trained_looking_sae(7, B=6)
    dead_F = torch.arange(sae.d_sae) % 3 == 0
    for terms in ({"sparsity": "l0"}, {"sparsity": "tanh", "pre_act_coefficient": 0.1}):
        rows = sae.loss(x_BD, 0.5, dead_F, **terms)
        nested = sae.loss(x_BD.view(2, 3, -1), 0.5, dead_F, **terms)
        for key in ("loss", "mse", "l0", "fired"):
            torch.testing.assert_close(nested[key], rows[key], msg=f"{key} with {terms}")


def test_dead_pull_acts_only_on_latents_marked_dead():
    """dead_pull adds dead_pull * log theta summed over the latents dead_F marks; without a mask, or
    with none marked, the loss is unchanged."""
    sae, x_BD = _trained_looking_sae(8)
    base = sae.loss(x_BD, 0.5)["loss"]
    assert sae.loss(x_BD, 0.5, None, dead_pull=0.1)["loss"] == base
    assert sae.loss(x_BD, 0.5, torch.zeros(sae.d_sae, dtype=torch.bool), dead_pull=0.1)["loss"] == base
    dead_F = torch.arange(sae.d_sae) < 3
    torch.testing.assert_close(sae.loss(x_BD, 0.5, dead_F, dead_pull=0.1)["loss"],
                               base + 0.1 * sae.log_threshold[:3].sum())


@given(case=dyadic_sae())
def test_active_exactly_when_pre_strictly_above_threshold(case):
    p, x, _, eps, pre_bias = case
    sae = _sae_from(p, eps, pre_bias)
    x_t = torch.tensor(x)
    with torch.no_grad():
        pre, f, theta = sae.pre_acts(x_t).numpy(), sae.encode(x_t).numpy(), sae.threshold.numpy()
    np.testing.assert_array_equal(f != 0, pre > theta)
    np.testing.assert_array_equal(f, np.where(pre > theta, pre, 0))


def test_a_threshold_of_zero_fires_on_positive_pre_activations_and_saves_exactly(tmp_path):
    """theta = 0 (as SAELens 6.48+ trains them) is log_threshold -inf: exp gives 0 back exactly, the
    latent fires where pre > 0 strictly, its gradients stay finite, and save/load keeps the zero."""
    sae = JumpReLUSAE(3, 4)
    with torch.no_grad():
        sae.log_threshold.copy_(exact_log(torch.tensor([0.0, 0.0, 0.5, 0.0])))
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([0.0, 1e-30, 0.6, -1e-30]))
    assert sae.log_threshold[0] == -math.inf and torch.equal(sae.threshold, torch.tensor([0.0, 0.0, 0.5, 0.0]))
    f = sae.encode(torch.randn(5, 3))
    assert f[:, 0].eq(0).all() and f[:, 1].eq(1e-30).all() and f[:, 2].eq(0.6).all() and f[:, 3].eq(0).all()
    for sparse in (False, True):
        sae.zero_grad()
        sae.loss(torch.randn(5, 3), 0.1, sparse=sparse)["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
        assert sae.log_threshold.grad[[0, 1, 3]].eq(0).all()           # d/dlog = theta * d/dtheta = 0
    sae.save(tmp_path / "sae")
    back = JumpReLUSAE.load(tmp_path / "sae")
    assert torch.equal(back.threshold, sae.threshold) and torch.equal(back.log_threshold, sae.log_threshold)


def test_pre_activation_equal_to_threshold_is_inactive():
    sae = JumpReLUSAE(3, 4, dtype=torch.float32)
    with torch.no_grad():
        sae.W_enc.zero_()
        theta = sae.threshold
        sae.b_enc.copy_(torch.stack([theta[0], torch.nextafter(theta[1], torch.tensor(1.0)),
                                     torch.nextafter(theta[2], torch.tensor(0.0)), theta[3] * 2]))
    f = sae.encode(torch.randn(5, 3))
    assert f[:, 0].eq(0).all() and f[:, 1].ne(0).all() and f[:, 2].eq(0).all() and f[:, 3].ne(0).all()


@given(case=dyadic_sae())
def test_l0_term_trains_only_the_thresholds(case):
    p, x, _, eps, pre_bias = case
    sae = _sae_from(p, eps, pre_bias)
    pre = sae.pre_acts(torch.tensor(x)).detach()
    sae.loss(torch.tensor(x), 1.0)["l0"].backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or not grad.any(), name
    in_window = ((pre - sae.threshold).abs() < eps / 2).any(0)
    np.testing.assert_array_equal((sae.log_threshold.grad < 0).numpy(), in_window.numpy())


@given(case=dyadic_sae(), raise_by=st.lists(st.floats(0, 4), min_size=8, max_size=8))
def test_raising_a_threshold_never_raises_l0(case, raise_by):
    p, x, _, eps, pre_bias = case
    sae = _sae_from(p, eps, pre_bias)
    with torch.no_grad():
        before = step(sae.pre_acts(torch.tensor(x)), sae.threshold, eps)
        sae.log_threshold += torch.tensor(raise_by[: sae.d_sae], dtype=torch.float64)
        after = step(sae.pre_acts(torch.tensor(x)), sae.threshold, eps)
    assert (after <= before).all()


# --- The sparse path: the dense path's loss and gradients from the kept entries ---------------


def _trained_looking_sae(seed, d_in=32, d_sae=512, B=256, l0=8, pre_bias=False, dtype=torch.float32):
    """A random SAE whose thresholds make about `l0` of `d_sae` latents fire per row, as after
    training: the regime the sparse path is for. Returns the SAE and a batch."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.05, pre_encoder_bias=pre_bias, dtype=dtype)
    x_BD = torch.randn(B, d_in, generator=g, dtype=dtype) / math.sqrt(d_in)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.05)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.05)
        pre_BF = sae.pre_acts(x_BD)
        theta_F = torch.quantile(pre_BF, 1 - l0 / d_sae, dim=0).clamp_min(1e-3)
        sae.log_threshold.copy_(theta_F.log())
        sae.bandwidth = 0.3 * pre_BF.std(0).median().item()      # the small recipe's bandwidth
    return sae, x_BD


def _loss_and_grads(sae, x_BD, lam, target, sparse):
    sae.zero_grad(set_to_none=True)
    out = sae.loss(x_BD, lam, **_sparsity(target), sparse=sparse)
    out["loss"].backward()
    return out, {name: q.grad.clone() for name, q in sae.named_parameters()}


@given(seed=st.integers(0, 2**31), pre_bias=st.booleans(), target=st.sampled_from([None, 8]),
       lam=st.floats(0, 1))
def test_sparse_path_equals_dense_path(seed, pre_bias, target, lam):
    sae, x_BD = _trained_looking_sae(seed, pre_bias=pre_bias)
    dense, dense_grads = _loss_and_grads(sae, x_BD, lam, target, sparse=False)
    sparse, sparse_grads = _loss_and_grads(sae, x_BD, lam, target, sparse=True)
    assert 0 < sparse["kept"] < 0.1                          # it did keep only a few entries
    for key in ("loss", "mse", "l0", "x_hat", "fired"):
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name                    # every gradient is exercised
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=f"gradient of {name}")


def test_sparse_path_threshold_gradient_counts_the_window_below_theta():
    """An inactive latent whose pre-activation is inside its window still gets a threshold
    gradient; the sparse path must keep it although its f is 0."""
    sae = JumpReLUSAE(2, 3, bandwidth=0.1, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, 3, dtype=torch.float64))
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]], dtype=torch.float64))
        sae.log_threshold.copy_(torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64).log())
    x_BD = torch.tensor([[0.47, 0.1]], dtype=torch.float64)    # latent 0: 0.03 below theta, in window
    _, dense_grads = _loss_and_grads(sae, x_BD, 1.0, None, sparse=False)
    out, sparse_grads = _loss_and_grads(sae, x_BD, 1.0, None, sparse=True)
    assert out["l0"].item() == 0
    assert dense_grads["log_threshold"][0] != 0 and dense_grads["log_threshold"][1] == 0
    torch.testing.assert_close(sparse_grads["log_threshold"], dense_grads["log_threshold"], rtol=1e-12, atol=0)


def test_sparse_path_with_nothing_kept():
    sae, x_BD = _trained_looking_sae(0, pre_bias=True)
    with torch.no_grad():
        sae.log_threshold.fill_(5.0)                         # theta ~ 148: nothing fires or is near
    dense, dense_grads = _loss_and_grads(sae, x_BD, 0.5, None, sparse=False)
    sparse, sparse_grads = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)
    assert sparse["kept"] == 0 and sparse["l0"].item() == 0 and not sparse["fired"].any()
    torch.testing.assert_close(sparse["x_hat"], sae.b_dec.detach().expand_as(x_BD))
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, msg=name)


def test_sparse_path_under_bf16_autocast_agrees_with_the_dense_path():
    """Under autocast both paths round the encoder's matmul to bf16 the same way, so the same
    latents fire; the sparse path then decodes in float32 where the dense one uses bf16. The
    thresholds' gradient stays float32."""
    sae, x_BD = _trained_looking_sae(1)
    results = []
    for sparse in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae.loss(x_BD, 0.1, sparse=sparse)
        sae.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert sae.log_threshold.grad.dtype == torch.float32
        results.append((out, {name: q.grad.clone() for name, q in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    assert sparse["l0"].item() == dense["l0"].item()
    assert torch.equal(sparse["fired"], dense["fired"])
    assert abs(sparse["mse"].item() - dense["mse"].item()) < 1e-2 * dense["mse"].item()
    for name, grad in dense_grads.items():
        err = (sparse_grads[name] - grad).norm() / grad.norm()
        assert err < 2e-2, (name, err.item())


def test_sparse_path_is_deterministic():
    """Two identical steps give bit-identical gradients (reruns and resumed runs depend on it),
    at a size where a parallel scatter's order would show: ~100 kept entries on each of 2,048 rows."""
    sae, x_BD = _trained_looking_sae(2, B=2048, l0=64)
    first = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)[1]
    for _ in range(3):
        again = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)[1]
        for name, grad in first.items():
            assert torch.equal(again[name], grad), name


def test_sparse_path_takes_a_batch_of_rows():
    sae = JumpReLUSAE(4, 8)
    with pytest.raises(ValueError, match="batch of rows"):
        sae.loss(torch.randn(2, 3, 4), 0.1, sparse=True)


def test_sparse_path_keeps_the_entries_above_theta_less_three_quarters_of_epsilon():
    """The kept entries are those with pre > theta - 3/4 epsilon, strictly: every active latent,
    every one inside its window, a quarter bandwidth of margin, and none further below.
    `kept` is their fraction (bench.py reports it per row)."""
    sae = JumpReLUSAE(1, 4, bandwidth=0.125, dtype=torch.float64)
    with torch.no_grad():                                     # theta 0.5, eps 1/8: floor 0.40625
        sae.W_enc.copy_(torch.tensor([[0.75, 0.46875, 0.40625, 0.3125]], dtype=torch.float64))
        sae.log_threshold.fill_(math.log(0.5))
    assert sae.threshold.eq(0.5).all()
    out = sae.loss(torch.ones(1, 1, dtype=torch.float64), 0.1, sparse=True)
    # active, in the window, exactly at the floor, and 1.5 epsilon below theta: the first two are kept
    assert out["kept"] == 2 / 4 and out["l0"].item() == 1


@pytest.mark.parametrize("trained", ["x", "W_enc", "b_enc"])
def test_sparse_path_gradient_reaches_whatever_alone_requires_one(trained):
    """With the rest of the SAE frozen, the input (as for attribution), W_enc or b_enc alone gets
    the dense path's gradient from the sparse path."""
    sae, x_BD = _trained_looking_sae(3)
    sae.requires_grad_(False)
    tensors = {"x": x_BD.clone(), "W_enc": sae.W_enc, "b_enc": sae.b_enc}
    tensors[trained].requires_grad_(True)
    grads = []
    for sparse in (False, True):
        tensors[trained].grad = None
        sae.loss(tensors["x"], 0.5, sparse=sparse)["loss"].backward()
        grads.append(tensors[trained].grad)
    dense, sparse = grads
    assert sparse is not None and dense.abs().max() > 0
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5 * dense.abs().max().item())


@pytest.mark.parametrize("pre_bias", [False, True], ids=["no-pre-bias", "pre-bias"])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sparse_path_of_a_half_precision_model_takes_float32_rows_under_autocast(model_dtype, pre_bias):
    """A bf16 or float16 model under bf16 autocast takes float32 activations on both paths (in a
    float16 model the bias turns the bf16 matmul's pre-activations float32), and the sparse path's
    gradients agree with the dense path's to that precision. With the pre-encoder bias the input
    needs a gradient too, whose bag sums the model's W_enc with float32 weights: that crashed."""
    float32_sae, x_BD = _trained_looking_sae(4, pre_bias=pre_bias)
    sae = JumpReLUSAE(float32_sae.d_in, float32_sae.d_sae, bandwidth=float32_sae.bandwidth, dtype=model_dtype,
                      pre_encoder_bias=pre_bias)
    sae.load_state_dict(float32_sae.state_dict())
    results = []
    for sparse in (False, True):
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae.loss(x_BD, 0.1, sparse=sparse)
        out["loss"].backward()
        results.append((out, {name: q.grad.clone() for name, q in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    assert sparse["l0"].item() == dense["l0"].item()
    for name, grad in dense_grads.items():
        err = (sparse_grads[name].float() - grad.float()).norm() / grad.float().norm()
        assert err < 2e-2, (name, err.item())


def test_sparse_terms_called_alone_follows_the_paper():
    """Without ste_to_input, sparse_terms sends the L0 estimator's gradient to the thresholds
    only, as the paper's loss does."""
    sae, x_BD = _trained_looking_sae(5)
    sparse_terms(sae, x_BD, sae.threshold)["l0_rows"].sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or not grad.any(), name
    assert sae.log_threshold.grad.any()


def test_sparse_path_allocates_on_the_device_of_its_inputs():
    """The sparse path's own tensors (L0, fired, the bags' offsets, b_enc's gradient) go on the
    inputs' device, not torch's default one: under a default of meta (as under a user's
    set_default_device("cuda")) a CPU SAE gives the same loss and gradients, bit for bit."""
    sae, x_BD = _trained_looking_sae(6, pre_bias=True)
    out, grads = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)
    with torch.device("meta"):
        again, again_grads = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)
    for key in ("loss", "l0", "x_hat", "fired"):
        assert torch.equal(again[key], out[key]), key
    for name, grad in grads.items():
        assert torch.equal(again_grads[name], grad), name


def test_finite_differences_agree_for_decoder_parameters():
    """The loss is smooth in W_dec and b_dec: central differences must match autograd."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(5, 12, bandwidth=0.05, threshold_init=0.05, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(7, 5, dtype=torch.float64)

    class Loss(torch.nn.Module):  # functional_call calls forward; this forward is sae.loss
        def __init__(self):
            super().__init__()
            self.sae = sae

        def forward(self, x):
            return self.sae.loss(x, 0.1)["loss"]

    for name in ("W_dec", "b_dec"):
        def loss_of(value, name=name):
            return torch.func.functional_call(Loss(), {f"sae.{name}": value}, (x,))
        value = getattr(sae, name).detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(loss_of, (value,), eps=1e-6, atol=1e-7, rtol=1e-6)


# --- Initialisation, the decoder constraint, bf16 ---------------------------------------------


def test_paper_initialisation():
    sae = JumpReLUSAE(16, 64)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert not sae.b_enc.any() and not sae.b_dec.any()
    torch.testing.assert_close(sae.threshold, torch.full((64,), 0.001))
    assert sae.bandwidth == 0.001 and not sae.pre_encoder_bias


@pytest.mark.parametrize("d_in, d_sae, settings", [
    (0, 4, {}), (4, 0, {}), (4, 4, {"bandwidth": 0.0}), (4, 4, {"threshold_init": 0.0}),
])
def test_constructor_refuses_a_setting_that_is_not_positive(d_in, d_sae, settings):
    """Each of d_in, d_sae, bandwidth and threshold_init alone is refused at 0, in one sentence."""
    with pytest.raises(ValueError, match="must be positive"):
        JumpReLUSAE(d_in, d_sae, **settings)


def test_encode_carries_the_estimator_at_the_sae_bandwidth():
    """encode is differentiable as the loss is: one latent with pre = 0.6 against theta = 0.5, inside
    the window (eps = 0.5), gives d f/d pre = 1 and d f/d log theta = theta * -(theta/eps) = -0.5."""
    sae = JumpReLUSAE(1, 1, bandwidth=0.5, threshold_init=0.5, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
    sae.encode(torch.tensor([[0.6]], dtype=torch.float64)).sum().backward()
    assert sae.b_enc.grad.item() == 1.0 and sae.log_threshold.grad.item() == pytest.approx(-0.5)


def test_decoder_projection_and_renormalisation():
    torch.manual_seed(1)
    sae = JumpReLUSAE(6, 10, dtype=torch.float64)
    sae.loss(torch.randn(32, 6, dtype=torch.float64), 0.0)["loss"].backward()
    g_before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad_()
    g = sae.W_dec.grad
    torch.testing.assert_close((g * sae.W_dec).sum(1), torch.zeros(10, dtype=torch.float64), atol=1e-12, rtol=0)
    # Only the parallel part was removed: the difference is along each row.
    diff = g_before - g
    torch.testing.assert_close(diff, (g_before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(10, 1, dtype=torch.float64) + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_decoder_projection_holds_for_rows_of_any_norm():
    """g -= (g.W / W.W) W row by row: training keeps the rows at unit norm, where dividing by W.W and
    multiplying by it agree; the projection is right for rows of other norms too, and leaves W as it is."""
    torch.manual_seed(2)
    sae = JumpReLUSAE(6, 10, dtype=torch.float64)
    W = torch.randn(10, 6, dtype=torch.float64) * (3 * torch.rand(10, 1, dtype=torch.float64) + 0.2)
    with torch.no_grad():
        sae.W_dec.copy_(W)
    sae.W_dec.grad = g = torch.randn(10, 6, dtype=torch.float64)
    want = g - (g * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close(sae.W_dec.grad, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(sae.W_dec.detach(), W)


def test_folded_scales_multiply_and_a_scale_that_is_not_positive_and_finite_is_refused():
    sae = _random_sae(0)
    W_enc = sae.W_enc.detach().clone()
    assert sae.fold_input_scale_(2.0).fold_input_scale_(3.0) is sae and sae.metadata["input_scale"] == 6.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="must be a positive finite number"):
            sae.fold_input_scale_(bad)
    assert sae.metadata["input_scale"] == 6.0 and torch.equal(sae.W_enc.detach(), W_enc * 6.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_keeps_thresholds_and_their_update_float32(device, model_dtype):
    torch.manual_seed(2)
    sae = JumpReLUSAE(32, 128, bandwidth=0.05, device=device, dtype=model_dtype)
    assert sae.log_threshold.dtype == torch.float32
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
    x = torch.randn(256, 32, device=device) * 0.05
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    before = sae.log_threshold.detach().clone()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = sae.loss(x, 1.0)
    assert out["l0"].dtype == torch.float32
    out["loss"].backward()
    assert sae.log_threshold.grad.dtype == torch.float32
    moved = sae.log_threshold.grad != 0
    assert moved.any()
    opt.step()
    # Adam moves each parameter with a gradient by about lr; in bf16 (spacing 2^-5 at 6.9) that rounds away.
    delta = (sae.log_threshold.detach() - before)[moved].abs()
    assert sae.log_threshold.dtype == torch.float32
    torch.testing.assert_close(delta, torch.full_like(delta, 1e-3), rtol=1e-2, atol=0)


# --- Save, load and the input scale -----------------------------------------------------------


def _random_sae(seed, d_in=6, d_sae=20, pre_bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.01, pre_encoder_bias=pre_bias, dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae


@given(seed=st.integers(0, 2**31), pre_bias=st.booleans())
def test_save_then_load_is_exact(tmp_path_factory, seed, pre_bias):
    sae = _random_sae(seed, pre_bias=pre_bias)
    sae.metadata.update(model="m", layer=3, site="resid", input_scale=0.25)
    folder = sae.save(tmp_path_factory.mktemp("sae"))
    loaded = JumpReLUSAE.load(folder)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.config() == sae.config()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(seed)) * 2
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    again = loaded.save(tmp_path_factory.mktemp("again"))
    assert (again / "sae.safetensors").read_bytes() == (folder / "sae.safetensors").read_bytes()


def test_folder_holds_gemma_scope_tensors_in_float32(tmp_path):
    """The folder (created with its parents) holds Gemma Scope's tensors in float32, and says so:
    config.json records the dtype, and the weights file's header names the architecture."""
    sae = _random_sae(0, dtype=torch.float64)
    folder = sae.save(tmp_path / "new" / "sae")
    tensors = load_file(str(folder / "sae.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["threshold"], sae.threshold.float())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (6, 20)
    assert cfg["dtype"] == "float32"
    with safe_open(str(folder / "sae.safetensors"), "pt") as f:
        assert f.metadata() == {"architecture": "jumprelu"}


@given(seed=st.integers(0, 2**31), scale=st.floats(1e-2, 1e2), pre_bias=st.booleans())
def test_folded_scale_gives_same_features_on_raw_inputs(tmp_path_factory, seed, scale, pre_bias):
    sae = _random_sae(seed, pre_bias=pre_bias, dtype=torch.float64)
    x_raw = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / scale
    with torch.no_grad():
        f_scaled, x_hat_scaled = sae.encode(x_raw * scale), sae(x_raw * scale)
        sae.fold_input_scale_(scale)
        f_raw, x_hat_raw = sae.encode(x_raw), sae(x_raw)
    assert sae.metadata["input_scale"] == scale
    torch.testing.assert_close(f_raw, f_scaled, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_hat_raw, x_hat_scaled / scale, rtol=1e-9, atol=1e-12)
    loaded = JumpReLUSAE.load(sae.save(tmp_path_factory.mktemp("folded")))
    assert loaded.metadata["input_scale"] == scale
    torch.testing.assert_close(loaded.encode(x_raw.float()), f_scaled.float(), rtol=1e-4, atol=1e-4)


def _saved(tmp_path):
    return _random_sae(0).save(tmp_path)


def _rewrite_weights(folder, edit, raw=None):
    """Replace the weights (edited, or by raw bytes) as another tool would: no sha256 in config.json."""
    tensors = edit(load_file(str(folder / "sae.safetensors")))
    if raw is None:
        save_file(tensors, str(folder / "sae.safetensors"))
    else:
        (folder / "sae.safetensors").write_bytes(raw)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_config(folder, keep_sha=False, **changes):
    """Edit config.json; without keep_sha, as another tool would (no sha256 entry)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    if not keep_sha:
        del cfg["sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (lambda f: _edit_config(f, architecture="topk"), "'topk' SAE, not a 'jumprelu'"),
    (lambda f: _edit_config(f, d_in=7), "W_enc of shape [6, 20], but config.json implies [7, 20]"),
    (lambda f: _edit_config(f, keep_sha=True, pre_encoder_bias=True), "does not match the sha256"),
    (lambda f: _edit_config(f, d_sae="20"), "no valid 'd_sae'"),
    (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "not list; re-save or restore the folder."),
    (lambda f: (f / "config.json").unlink(), "has no config.json; it is not an SAE folder written by this project."),
    (lambda f: (f / "sae.safetensors").write_bytes((f / "sae.safetensors").read_bytes()[:100]), "does not match the sha256"),
    (lambda f: _rewrite_weights(f, lambda t: t, (f / "sae.safetensors").read_bytes()[:100]), "cannot be read"),
    (lambda f: _rewrite_weights(f, lambda t: {k: v for k, v in t.items() if k != "threshold"}), "has no tensor 'threshold'"),
    (lambda f: _rewrite_weights(f, lambda t: {**t, "threshold": -torch.ones(20)}), "has 20 thresholds below 0"),
    (lambda f: _rewrite_weights(f, lambda t: {**t, "W_enc": t["W_enc"].double()}), "not float32"),
])
def test_load_rejects_a_bad_folder_in_one_sentence(tmp_path, damage, message):
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(ValueError) as info:
        JumpReLUSAE.load(folder)
    assert message in str(info.value) and str(folder) in str(info.value)    # it names the folder
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


def test_load_of_a_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        JumpReLUSAE.load(tmp_path / "nowhere")


@pytest.mark.parametrize("changes, refused", [
    ({"d_in": 1, "d_sae": 1, "k": 1}, None),
    ({"d_in": 0}, "no valid 'd_in'"),
    ({"d_sae": 0}, "no valid 'd_sae'"),
    ({"bandwidth": 1e-30}, None),
    ({"bandwidth": 0}, "invalid 'bandwidth'"),
    ({"pre_encoder_bias": True}, None),
    ({"pre_encoder_bias": "false"}, "invalid 'pre_encoder_bias'"),
    ({"k": 20}, None),
    ({"k": 0}, "invalid 'k'"),
    ({"k": 21}, "invalid 'k'"),
])
def test_read_folder_checks_each_setting_at_its_bounds(tmp_path, changes, refused):
    """read_folder, shared by every architecture, accepts d_in and d_sae from 1, a bandwidth above
    0, a bool pre_encoder_bias and k from 1 to d_sae (here 20), and refuses the values just outside."""
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    if refused is None:
        cfg, _ = read_folder(folder, "jumprelu")
        assert {key: cfg[key] for key in changes} == changes
    else:
        with pytest.raises(ValueError, match=refused):
            read_folder(folder, "jumprelu")


def test_load_fills_in_the_settings_a_folder_lacks(tmp_path):
    """A folder written by another tool may have no bandwidth or pre_encoder_bias: it loads with
    the defaults, bandwidth 0.001 and no pre-encoder bias."""
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("sha256", "bandwidth", "pre_encoder_bias"):
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    sae = JumpReLUSAE.load(folder)
    assert sae.bandwidth == 0.001 and sae.pre_encoder_bias is False


@pytest.mark.parametrize("device", DEVICES)
def test_load_builds_the_sae_on_the_device_asked_for(tmp_path, device):
    """Every parameter is allocated on `device`, whatever torch's default device is (meta here, so
    that a machine without a GPU shows it too), and holds the saved values."""
    sae = _random_sae(0)
    with torch.device("meta"):
        loaded = JumpReLUSAE.load(sae.save(tmp_path), device=device)
    assert {p.device.type for p in loaded.parameters()} == {device}
    assert torch.equal(loaded.W_enc.cpu(), sae.W_enc) and torch.equal(loaded.threshold.cpu(), sae.threshold)


def test_folder_digest_covers_the_other_entries_in_canonical_json(tmp_path):
    """The sha256 is over config.json's other entries in canonical JSON: a tool that reorders the
    keys leaves the folder loadable, and the sha256 entry itself is not part of what it covers."""
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(reversed(list(cfg.items())))))
    JumpReLUSAE.load(folder)
    weights = (folder / "sae.safetensors").read_bytes()
    without = {key: value for key, value in cfg.items() if key != "sha256"}
    assert folder_digest(weights, cfg) == folder_digest(weights, without) == cfg["sha256"]


def test_atomic_write_raises_the_error_that_stopped_it(tmp_path, monkeypatch):
    """When the temporary file cannot even be created (a folder the user may not write to), the
    caller gets that error, not a second one from the clean-up, and nothing is left behind."""
    def refuse(*args, **kwargs):
        raise PermissionError(f"no permission to write in {tmp_path}")
    monkeypatch.setattr("jumprelu.open", refuse, raising=False)
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))
    assert not list(tmp_path.iterdir())
