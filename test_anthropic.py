"""Tests for anthropic.py: Anthropic's JumpReLU against an independent NumPy reference written from
their definitions (docs/maths.md section 3.3), by hand, and the conversion of their constants.

    python -m pytest test_anthropic.py
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from anthropic import DEFAULTS, AnthropicJumpReLUSAE, in_our_units, jumprelu_to_input
from test_jumprelu import (DEVICES, _torch, assert_matches, dyadic_sae, ref_H, ref_jumprelu, ref_jumprelu_grads,
                           ref_K, sae_from, trained_looking_sae, z_theta_eps)


# --- The NumPy reference -------------------------------------------------------------------------


def ref_jumprelu_to_input_grads(z, theta, eps, g):
    """(d/dz, d/dtheta) of sum(g * jumprelu_to_input(z, theta)): the paper's, with +(theta/eps)
    K((z - theta)/eps) on z too, since the estimator of the jump depends on z only through z - theta."""
    d_z, d_theta = ref_jumprelu_grads(z, theta, eps, g)
    return d_z + (theta / eps) * ref_K((z - theta) / eps) * g, d_theta


def ref_anthropic_sae(p, x, lam, eps, pre_bias, c, lam_p, dead):
    """Anthropic's loss, forward and every gradient, by hand:

    L = (1/B) sum_b ||x_b - x_hat_b||^2 + lam * (1/B) sum_b sum_i tanh(c f_bi ||W_dec,i||)
        + lam_p * (1/B) sum_b sum_{i dead} ReLU(theta_i - pre_bi) ||W_dec,i||,
    with the estimator's gradient of the jump reaching pre as well as theta.
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
    t = np.tanh(c * f * norms)
    loss = mse + lam * t.sum(1).mean() + lam_p * (gap * norms).sum(1).mean()

    d_x_hat = 2.0 * (x_hat - x) / B
    d_f = d_x_hat @ p["W_dec"].T + (lam / B) * c * norms * (1 - t ** 2)
    below = (theta > pre) * dead * norms * (lam_p / B)       # d/dtheta of the pre-activation loss; -d/dpre
    d_pre = d_f * active + d_f * (theta / eps) * kernel - below
    d_theta = (d_f * -(theta / eps) * kernel).sum(0) + below.sum(0)
    d_norms = ((lam / B) * c * f * (1 - t ** 2)).sum(0) + (lam_p / B) * gap.sum(0)
    grads = {
        "W_dec": f.T @ d_x_hat + d_norms[..., None] * unit,
        "b_dec": d_x_hat.sum(0) - (d_pre.sum(0) @ p["W_enc"].T if pre_bias else 0.0),
        "W_enc": x_in.T @ d_pre,
        "b_enc": d_pre.sum(0),
        "log_threshold": theta * d_theta,
    }
    return {"f": f, "x_hat": x_hat, "mse": mse, "l0": active.sum(1).mean(), "loss": loss}, grads


# --- Against the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_the_estimator_passed_on_to_the_input_matches_the_reference(device, data):
    """The paper's forward and theta-gradient, and the kernel term, with the opposite sign, on z as well."""
    z, theta, eps, g = data.draw(z_theta_eps(np.float64))
    z_t, theta_t = _torch(z, device, True), _torch(theta, device, True)
    out = jumprelu_to_input(z_t, theta_t, eps)
    np.testing.assert_array_equal(out.detach().cpu().numpy(), ref_jumprelu(z, theta))
    d_z, d_theta = torch.autograd.grad(out, (z_t, theta_t), _torch(g, device))
    ref_d_z, ref_d_theta = ref_jumprelu_to_input_grads(z, theta, eps, g)
    np.testing.assert_allclose(d_z.cpu().numpy(), ref_d_z, rtol=1e-12, atol=1e-12 * np.abs(ref_d_z).max(initial=1))
    np.testing.assert_allclose(d_theta.cpu().numpy(), ref_d_theta, rtol=1e-12, atol=1e-12 * np.abs(ref_d_theta).max(initial=1))


@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float64])
@given(data=st.data())
def test_the_estimators_gradient_on_z_is_in_zs_dtype(z_dtype, data):
    """Against float32 thresholds, bf16 z (autocast, computed in float32) and float64 z (computed in
    float64, but for theta/eps, in theta's float32) each get their gradient in their own dtype, with
    the reference's kernel term."""
    z, theta, eps, g = data.draw(z_theta_eps(np.float32))
    z_t, g_t = torch.tensor(z).to(z_dtype).requires_grad_(), torch.tensor(g).to(z_dtype)
    theta_t = _torch(theta, "cpu", True)
    d_z, d_theta = torch.autograd.grad(jumprelu_to_input(z_t, theta_t, eps), (z_t, theta_t), g_t)
    assert d_z.dtype == z_dtype and d_theta.dtype == torch.float32
    wide = torch.float32 if z_dtype == torch.bfloat16 else torch.float64      # the dtype torch computes in
    np_wide = np.float32 if z_dtype == torch.bfloat16 else np.float64
    ref_d_z, _ = ref_jumprelu_to_input_grads(z_t.detach().to(wide).numpy(), theta.astype(np_wide),
                                             np_wide(eps) if wide == torch.float32 else eps, g_t.to(wide).numpy())
    rtol = 2 ** -7 if z_dtype == torch.bfloat16 else 2 ** -22               # bf16 rounds the sum to 8 bits
    np.testing.assert_allclose(d_z.to(wide).numpy(), ref_d_z, rtol=rtol, atol=rtol * np.abs(ref_d_z).max(initial=1))


@given(case=dyadic_sae(), data=st.data())
def test_anthropics_loss_and_every_gradient(case, data):
    """The tanh penalty (scale c) and the pre-activation loss on the latents marked dead, each on or
    off, against ref_anthropic_sae."""
    p, x, lam, eps, pre_bias = case
    F = p["theta"].size
    c = data.draw(st.sampled_from([0.5, 4.0, 96.0]))
    lam_p = data.draw(st.sampled_from([0.0, 0.25, 3.0]))
    dead = data.draw(st.one_of(st.none(), hnp.arrays(np.bool_, (F,))))
    sae = sae_from(p, eps, pre_bias, cls=AnthropicJumpReLUSAE)
    p = {**p, "theta": sae.threshold.detach().numpy()}
    ref, ref_grads = ref_anthropic_sae(p, x, lam, eps, pre_bias, c, lam_p, dead)
    out = sae.loss(torch.tensor(x), lam, None if dead is None else torch.tensor(dead), tanh_scale=c,
                   pre_act_coefficient=lam_p)
    np.testing.assert_array_equal(out["fired"].numpy(), (ref["f"] != 0).any(0))
    assert_matches(sae, out, ref, ref_grads, keys=("f", "x_hat", "mse", "l0", "loss"))


# --- By hand ----------------------------------------------------------------------------------------


def test_anthropic_hand_computed_case():
    """One latent, one row, numbers by hand: pre = 0.75 against theta = 0.5 (eps 0.5, so pre is at the
    window's edge and outside it), c = 2, ||W_dec|| = 1; then a dead latent below its threshold."""
    sae = AnthropicJumpReLUSAE(1, 1, bandwidth=0.5, threshold_init=0.5, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.fill_(1.0), sae.W_dec.fill_(1.0)
    x = torch.tensor([[0.75]], dtype=torch.float64)
    out = sae.loss(x, 0.1, tanh_scale=2.0)
    # f = 0.75, x_hat = 0.75: mse 0; penalty 0.1 * tanh(2 * 0.75 * 1)
    assert out["loss"].item() == pytest.approx(0.1 * math.tanh(1.5))
    out["loss"].backward()
    # d/db_enc = d/df = 0.1 * 2 * (1 - tanh(1.5)^2); the jump is outside the window: no theta gradient
    assert sae.b_enc.grad.item() == pytest.approx(0.2 * (1 - math.tanh(1.5) ** 2))
    assert sae.log_threshold.grad.item() == 0.0
    sae.zero_grad()
    x = torch.tensor([[0.25]], dtype=torch.float64)                  # below theta: f = 0, x_hat = 0
    out = sae.loss(x, 0.0, torch.tensor([True]), pre_act_coefficient=3.0)
    # mse 0.25^2; pre-activation loss 3 * ReLU(0.5 - 0.25) * 1 = 0.75
    assert out["loss"].item() == pytest.approx(0.0625 + 0.75)
    out["loss"].backward()
    # pre = 0.25 is inside the window (|0.25 - 0.5| / 0.5 = 0.5 is its edge: not inside), so only the
    # pre-activation loss: d/dpre = -3, d/dtheta = +3 (d/dlog theta = 0.5 * 3)
    assert sae.b_enc.grad.item() == pytest.approx(-3.0) and sae.log_threshold.grad.item() == pytest.approx(1.5)


def test_the_tanh_penalty_by_hand_with_the_default_scale():
    """Two rows through an identity SAE with theta = 0.5: f = [1, 0] and [2, 3]; the default c = 4 on
    unit decoder rows gives (tanh 4 + tanh 8 + tanh 12) / 2, and the L0 of 1.5 is reported, not penalised."""
    sae = AnthropicJumpReLUSAE(2, 2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)), sae.W_dec.copy_(torch.eye(2)), sae.log_threshold.fill_(math.log(0.5))
    out = sae.loss(torch.tensor([[1.0, 0.25], [2.0, 3.0]], dtype=torch.float64), 0.5)
    assert out["l0"].item() == 1.5 and out["mse"].item() == 0.25**2 / 2       # x_hat = f
    penalty = (math.tanh(4.0) + math.tanh(8.0) + math.tanh(12.0)) / 2
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.5 * penalty, rel=1e-12)


def test_the_loss_takes_any_leading_dimensions():
    """A [2, 3, d_in] batch gives the loss, MSE, L0 and fired latents of its 6 rows."""
    plain, x_BD = trained_looking_sae(7, B=6)
    sae = AnthropicJumpReLUSAE(plain.d_in, plain.d_sae, bandwidth=plain.bandwidth)
    sae.load_state_dict(plain.state_dict())
    dead_F = torch.arange(sae.d_sae) % 3 == 0
    rows = sae.loss(x_BD, 0.5, dead_F, pre_act_coefficient=0.1)
    nested = sae.loss(x_BD.view(2, 3, -1), 0.5, dead_F, pre_act_coefficient=0.1)
    for key in ("loss", "mse", "l0", "fired"):
        torch.testing.assert_close(nested[key], rows[key], msg=key)


# --- The units of the constants ------------------------------------------------------------------


def test_in_our_units_converts_from_inputs_of_norm_sqrt_d_in():
    """Anthropic's constants are for inputs scaled to E||x|| = sqrt(d_in): x_theirs = r x_ours, so the
    pre-activations scale by r and the MSE by r^2; the loss of our SAE on x_ours, times r^2, must be
    theirs on x_theirs with their constants."""
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 0.3
    hp = in_our_units(dict(DEFAULTS), x)
    r = math.sqrt(8) / x.norm(dim=1).mean().item()
    ours = AnthropicJumpReLUSAE(8, 16, bandwidth=hp["bandwidth"], threshold_init=0.05, dtype=torch.float64)
    theirs = AnthropicJumpReLUSAE(8, 16, bandwidth=2.0, threshold_init=0.05 * r, dtype=torch.float64)
    with torch.no_grad():
        theirs.W_enc.copy_(ours.W_enc), theirs.W_dec.copy_(ours.W_dec)
    dead = torch.arange(16) % 3 == 0
    a = ours.loss(x.double(), 1e-3, dead, tanh_scale=hp["tanh_scale"],                 # tanh has no units
                  pre_act_coefficient=hp["pre_act_coefficient"])
    b = theirs.loss(x.double() * r, 1e-3 * r ** 2, dead, tanh_scale=4.0, pre_act_coefficient=3e-6)
    assert (a["loss"] * r ** 2).item() == pytest.approx(b["loss"].item(), rel=1e-9)
    assert (a["f"] * r).detach().allclose(b["f"].detach())
