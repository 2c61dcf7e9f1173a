"""Tests for jumprelu.py, the paper: an independent NumPy reference and hypothesis property tests.

The reference below is written from docs/maths.md sections 1-3, not from jumprelu.py: the forward
pass and every pseudo-derivative by hand, so that the two can disagree. The other JumpReLU test
files (test_penalties.py, test_anthropic.py, test_sparse.py, test_sae_folder.py) import it and the
SAE-drawing helpers from here.

    python -m pytest test_jumprelu.py                          # quick, deterministic (CI)
    HYPOTHESIS_PROFILE=dev python -m pytest test_jumprelu.py   # many more examples
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jumprelu import JumpReLUSAE, jumprelu, rectangle, step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- The NumPy reference (docs/maths.md sections 1 and 2) ---------------------------------------


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


def ref_jumprelu_grads(z, theta, eps, g):
    """(d/dz, d/dtheta) of sum(g * jumprelu(z, theta)): H(z - theta) and -(theta/eps) K((z-theta)/eps)."""
    d_z = g * ref_H(z - theta)
    d_theta = -(theta / eps) * ref_K((z - theta) / eps) * g
    return d_z, ref_reduce(d_theta, np.shape(theta))


def ref_step(z, theta):
    return ref_H(z - theta)


def ref_step_grad_theta(z, theta, eps, g):
    """d/dtheta of sum(g * step(z, theta)) = -(1/eps) K((z - theta)/eps) (and d/dz = 0)."""
    return ref_reduce(-(1.0 / eps) * ref_K((z - theta) / eps) * g, np.shape(theta))


def ref_sae(p, x, lam, eps, pre_bias, penalty="l0", target=None):
    """The SAE forward, loss and the gradient of the loss for every parameter, by hand.

    L = (1/B) sum_b ||x_b - x_hat_b||^2 + lam * S,  L0_b = sum_i H(pre_bi - theta_i), with
    S = mean_b L0_b (the paper, penalty "l0"), mean_b (2/K)(L0_b - K)^2 (Gemma Scope 2, "target_row")
    or (2/K)(mean_b L0_b - K)^2 ("target_batch") for a target K.
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
    # S and B dS/dL0_b, each row's share of the penalty's gradient
    S, dS_dl0 = {"l0": lambda: (l0, np.ones(B)),
                 "target_row": lambda: (((2.0 / target) * (l0_rows - target) ** 2).mean(), (4.0 / target) * (l0_rows - target)),
                 "target_batch": lambda: ((2.0 / target) * (l0 - target) ** 2, np.full(B, (4.0 / target) * (l0 - target))),
                 }[penalty]()
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
    return {"pre": pre, "f": f, "x_hat": x_hat, "mse": mse, "l0": l0, "loss": mse + lam * S}, grads


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


OFFSETS = st.one_of(st.sampled_from([0.0, 0.5, -0.5, 0.25, -0.25, 1.0, -1.0]),
                    st.floats(-3, 3, allow_nan=False), st.just(math.nan))


@st.composite
def z_theta_eps(draw, dtype=np.float64):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    theta_shape = draw(st.sampled_from([shape[-1:], (1,) * len(shape[:-1]) + shape[-1:]]))   # theta has z's last dim
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
    thresholds give the float64 reference's forward and gradient on z, and float32 theta-gradients
    from sums taken in float64."""
    z, theta, eps, g = data.draw(z_theta_eps(np.float64))
    theta = theta.astype(np.float32)
    z_t, theta_t = _torch(z, "cpu", True), _torch(theta, "cpu", True)
    theta_64 = theta.astype(np.float64)                       # the float32 values, exactly
    out = jumprelu(z_t, theta_t, eps)
    np.testing.assert_array_equal(out.detach().numpy(), ref_jumprelu(z, theta_64))
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, "cpu"))
    ref_d_z, ref_d_theta = ref_jumprelu_grads(z, theta_64, eps, g)
    assert d_z.dtype == torch.float64 and d_theta.dtype == torch.float32
    np.testing.assert_array_equal(d_z.numpy(), ref_d_z)
    np.testing.assert_allclose(d_theta.numpy(), ref_d_theta, rtol=1e-6, atol=1e-6 * np.abs(ref_d_theta).max(initial=1))
    s = step(z_t, theta_t, eps)
    assert s.dtype == torch.float64
    np.testing.assert_array_equal(s.detach().numpy(), ref_step(z, theta_64))


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


def sae_from(p, eps, pre_bias, device="cpu", dtype=torch.float64, cls=JumpReLUSAE):
    """A `cls` SAE holding the weights and thresholds of a dyadic_sae draw."""
    D, F = p["W_enc"].shape
    sae = cls(D, F, bandwidth=eps, pre_encoder_bias=pre_bias, device=device, dtype=dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.tensor(p[name]))
        sae.log_threshold.copy_(torch.tensor(np.log(p["theta"])))
    return sae


def assert_matches(sae, out, ref, ref_grads, keys=("x_hat", "mse", "l0", "loss")):
    """A loss's terms and, after its backward, every parameter's gradient, against the reference's."""
    for key in keys:
        np.testing.assert_allclose(out[key].detach().cpu().numpy(), ref[key], rtol=1e-12, atol=1e-12, err_msg=key)
    out["loss"].backward()
    for name, ref_grad in ref_grads.items():
        np.testing.assert_allclose(getattr(sae, name).grad.cpu().numpy(), ref_grad, rtol=1e-10,
                                   atol=1e-10 * max(1, np.abs(ref_grad).max()), err_msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@given(case=dyadic_sae())
def test_sae_forward_loss_and_every_gradient(device, case):
    """The paper's loss against the reference; the thresholds sit at pre-activations, at the
    window's edges and inside it."""
    p, x, lam, eps, pre_bias = case
    sae = sae_from(p, eps, pre_bias, device)
    # The reference uses the thresholds the model actually holds (exp of a float64 log).
    p = {**p, "theta": sae.threshold.detach().cpu().numpy()}
    ref, ref_grads = ref_sae(p, x, lam, eps, pre_bias)
    out = sae.loss(torch.tensor(x, device=device), lam)
    for key in ("pre", "f"):
        np.testing.assert_array_equal(out[key].detach().cpu().numpy(), ref[key])
    assert_matches(sae, out, ref, ref_grads)


@given(case=dyadic_sae())
def test_active_exactly_when_pre_strictly_above_threshold(case):
    p, x, _, eps, pre_bias = case
    sae = sae_from(p, eps, pre_bias)
    x_t = torch.tensor(x)
    with torch.no_grad():
        pre, f, theta = sae.pre_acts(x_t).numpy(), sae.encode(x_t).numpy(), sae.threshold.numpy()
    np.testing.assert_array_equal(f != 0, pre > theta)
    np.testing.assert_array_equal(f, np.where(pre > theta, pre, 0))


def test_a_threshold_of_zero_fires_on_positive_pre_activations():
    """theta = 0 (as SAELens 6.48+ trains them) is log_threshold -inf: exp gives 0 back exactly, the
    latent fires where pre > 0 strictly, and its gradients stay finite (test_sae_folder.py: it saves
    exactly; test_sparse.py: the sparse path agrees)."""
    sae = zero_threshold_sae()
    assert sae.log_threshold[0] == -math.inf and torch.equal(sae.threshold, torch.tensor([0.0, 0.0, 0.5, 0.0]))
    f = sae.encode(torch.randn(5, 3))
    assert f[:, 0].eq(0).all() and f[:, 1].eq(1e-30).all() and f[:, 2].eq(0.6).all() and f[:, 3].eq(0).all()
    sae.loss(torch.randn(5, 3), 0.1)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
    assert sae.log_threshold.grad[[0, 1, 3]].eq(0).all()           # d/dlog = theta * d/dtheta = 0


def zero_threshold_sae():
    """Four latents with thresholds 0, 0, 0.5, 0 and constant pre-activations 0, 1e-30, 0.6, -1e-30."""
    sae = JumpReLUSAE(3, 4)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([-math.inf, -math.inf, math.log(0.5), -math.inf]))
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([0.0, 1e-30, 0.6, -1e-30]))
    return sae


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
    sae = sae_from(p, eps, pre_bias)
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
    sae = sae_from(p, eps, pre_bias)
    with torch.no_grad():
        before = step(sae.pre_acts(torch.tensor(x)), sae.threshold, eps)
        sae.log_threshold += torch.tensor(raise_by[: sae.d_sae], dtype=torch.float64)
        after = step(sae.pre_acts(torch.tensor(x)), sae.threshold, eps)
    assert (after <= before).all()


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


# --- Initialisation, the decoder constraint, the input scale, bf16 -----------------------------


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
    sae = random_sae(0)
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


# --- SAEs the other test files draw --------------------------------------------------------------


def trained_looking_sae(seed, d_in=32, d_sae=512, B=256, l0=8, pre_bias=False, dtype=torch.float32):
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


def random_sae(seed, d_in=6, d_sae=20, pre_bias=False, dtype=torch.float32):
    """A JumpReLUSAE with every parameter drawn from N(0, 0.25), seeded."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.01, pre_encoder_bias=pre_bias, dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae
