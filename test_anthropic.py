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

import train
from anthropic import DEFAULTS, THEIR_BANDWIDTH, AnthropicJumpReLUSAE, in_our_units, jumprelu_to_input
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


@given(case=dyadic_sae(), data=st.data())
def test_a_training_step_moves_every_parameter_by_the_references_gradient_with_free_decoder_norms(case, data):
    """train.train_step (train.py's and bench.py's step) with plain SGD: every parameter moves by -lr times
    ref_anthropic_sae's gradient, W_dec included: its rows, of any norm, are neither projected nor
    renormalised, as in Anthropic's and SAELens's training (docs/maths.md section 3.3)."""
    p, x, lam, eps, pre_bias = case
    c, lam_p, lr = 4.0, data.draw(st.sampled_from([0.0, 0.25, 3.0])), 0.125
    dead = data.draw(hnp.arrays(np.bool_, (p["theta"].size,)))
    sae = sae_from(p, eps, pre_bias, cls=AnthropicJumpReLUSAE)
    p = {**p, "theta": sae.threshold.detach().numpy()}
    _, ref_grads = ref_anthropic_sae(p, x, lam, eps, pre_bias, c, lam_p, dead)
    before = {name: getattr(sae, name).detach().clone().numpy() for name in ref_grads}
    fired_at = torch.tensor(np.where(dead, 0, 1))              # dead: not fired in the last step
    train.train_step(sae, torch.optim.SGD(sae.parameters(), lr=lr),
                     lambda x_BD, lam, dead_F: sae.loss(x_BD, lam, dead_F, tanh_scale=c, pre_act_coefficient=lam_p),
                     torch.tensor(x), lam, fired_at, 1, dead_steps=1)
    for name, ref_grad in ref_grads.items():
        np.testing.assert_allclose(getattr(sae, name).detach().numpy(), before[name] - lr * ref_grad, rtol=1e-10,
                                   atol=1e-10 * max(1, np.abs(before[name]).max(), np.abs(ref_grad).max()), err_msg=name)


def test_the_loss_is_saelenss_tanh_mode_with_free_decoder_norms():
    """Another reference where sae-lens is installed (requirements.txt does not ask for it): SAELens's
    JumpReLU training SAE in its "tanh" mode (SAELens 6.11 and later), with our weights and decoder rows
    of norms 0.5 to 4, gives the same loss and the same W_dec gradient (which no estimator touches)."""
    pytest.importorskip("sae_lens", reason="sae-lens is not installed; the NumPy reference above holds the loss")
    import dataclasses

    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    torch.manual_seed(0)
    ours = AnthropicJumpReLUSAE(6, 12, bandwidth=0.5, threshold_init=0.1, dtype=torch.float64)
    with torch.no_grad():
        ours.W_dec.mul_(torch.linspace(0.5, 4.0, 12, dtype=torch.float64).unsqueeze(1))
        ours.b_enc.copy_(torch.randn(12) * 0.1), ours.b_dec.copy_(torch.randn(6) * 0.1)
    cfg = JumpReLUTrainingSAEConfig(d_in=6, d_sae=12, dtype="float64", jumprelu_sparsity_loss_mode="tanh",
                                    jumprelu_tanh_scale=4.0, pre_act_loss_coefficient=0.25, jumprelu_bandwidth=0.5,
                                    jumprelu_init_threshold=0.1, l0_coefficient=0.5, apply_b_dec_to_input=False,
                                    normalize_activations="none", decoder_init_norm=None)
    theirs = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"):
            getattr(theirs, name).copy_(getattr(ours, name))
    x, dead = torch.randn(32, 6, dtype=torch.float64), torch.arange(12) % 3 == 0
    fields = {f.name for f in dataclasses.fields(TrainStepInput)}
    step = TrainStepInput(sae_in=x, coefficients={"l0": 0.5}, dead_neuron_mask=dead,
                          **({"n_training_steps": 0} if "n_training_steps" in fields else {}))
    b = theirs.training_forward_pass(step)
    a = ours.loss(x, 0.5, dead, tanh_scale=4.0, pre_act_coefficient=0.25)
    torch.testing.assert_close(a["loss"], b.loss)
    a["loss"].backward(), b.loss.backward()
    torch.testing.assert_close(ours.W_dec.grad, theirs.W_dec.grad)


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


def test_anthropic_hand_computed_case_with_a_decoder_row_of_norm_2():
    """The case above with W_dec = 2: the penalties weigh f and the pre-activation gap by ||W_dec|| = 2,
    and W_dec gets their gradient along itself, which a unit-norm constraint would project away."""
    sae = AnthropicJumpReLUSAE(1, 1, bandwidth=0.5, threshold_init=0.5, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.fill_(1.0), sae.W_dec.fill_(2.0)
    out = sae.loss(torch.tensor([[0.75]], dtype=torch.float64), 0.1, tanh_scale=2.0)
    # f = 0.75, x_hat = 1.5: mse 0.75^2; penalty 0.1 * tanh(2 * 0.75 * 2)
    sech2 = 1 - math.tanh(3.0) ** 2
    assert out["loss"].item() == pytest.approx(0.5625 + 0.1 * math.tanh(3.0))
    out["loss"].backward()
    # d/dW_dec = 2 (x_hat - x) f + 0.1 * 2 * f * sech^2; d/df = 2 (x_hat - x) W_dec + 0.1 * 2 * 2 * sech^2
    assert sae.W_dec.grad.item() == pytest.approx(1.125 + 0.15 * sech2)
    assert sae.b_enc.grad.item() == pytest.approx(3.0 + 0.4 * sech2) and sae.log_threshold.grad.item() == 0.0
    sae.zero_grad()
    out = sae.loss(torch.tensor([[0.25]], dtype=torch.float64), 0.0, torch.tensor([True]), pre_act_coefficient=3.0)
    # f = 0: mse 0.25^2; pre-activation loss 3 * ReLU(0.5 - 0.25) * 2 = 1.5
    assert out["loss"].item() == pytest.approx(0.0625 + 1.5)
    out["loss"].backward()
    # d/dW_dec = 3 * 0.25; d/dpre = -3 * 2; d/dtheta = +6, d/dlog theta = 0.5 * 6
    assert sae.W_dec.grad.item() == pytest.approx(0.75) and sae.b_enc.grad.item() == pytest.approx(-6.0)
    assert sae.log_threshold.grad.item() == pytest.approx(3.0)


def test_the_decoder_constraint_is_a_no_op():
    """train.py calls both every step; on Anthropic's SAE they leave W_dec and its gradient as they are."""
    sae = AnthropicJumpReLUSAE(4, 8)
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1.0, 9.0).unsqueeze(1))
    sae.W_dec.grad = torch.ones_like(sae.W_dec)
    W_dec, grad = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad_()
    sae.normalize_decoder_()
    assert torch.equal(sae.W_dec, W_dec) and torch.equal(sae.W_dec.grad, grad)


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


def test_in_our_units_converts_from_inputs_of_norm_sqrt_d_in_with_free_decoder_norms():
    """docs/maths.md section 3.3: Anthropic's constants are for inputs x_theirs = r x_ours. Their SAE with
    our W_enc and W_dec (decoder rows of norms 0.5 to 4 here, so the norms matter) and b_enc, b_dec and
    theta times r has pre-activations and f times r; with the converted constants, the loss of ours on
    x_ours times r^2 is theirs on x_theirs, and so are the gradients of W_enc, W_dec and log theta."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64) * 0.3
    hp = in_our_units({**DEFAULTS, "bandwidth": THEIR_BANDWIDTH}, x)
    r = math.sqrt(8) / x.norm(dim=1).mean().item()
    ours = AnthropicJumpReLUSAE(8, 16, bandwidth=hp["bandwidth"], threshold_init=0.05, dtype=torch.float64)
    theirs = AnthropicJumpReLUSAE(8, 16, bandwidth=2.0, threshold_init=0.05 * r, dtype=torch.float64)
    with torch.no_grad():
        ours.W_dec.mul_(torch.linspace(0.5, 4.0, 16, dtype=torch.float64).unsqueeze(1))
        ours.b_enc.copy_(torch.randn(16) * 0.1), ours.b_dec.copy_(torch.randn(8) * 0.1)
        for name, factor in (("W_enc", 1), ("W_dec", 1), ("b_enc", r), ("b_dec", r)):
            getattr(theirs, name).copy_(getattr(ours, name) * factor)
    dead = torch.arange(16) % 3 == 0
    a = ours.loss(x, 1e-3, dead, tanh_scale=hp["tanh_scale"], pre_act_coefficient=hp["pre_act_coefficient"])
    b = theirs.loss(x * r, 1e-3 * r ** 2, dead, tanh_scale=4.0, pre_act_coefficient=3e-6)
    assert (a["loss"] * r ** 2).item() == pytest.approx(b["loss"].item(), rel=1e-9)
    assert (a["f"] * r).detach().allclose(b["f"].detach()) and (a["f"] > 0).any()
    a["loss"].backward(), b["loss"].backward()
    for name in ("W_enc", "W_dec", "log_threshold"):
        torch.testing.assert_close(getattr(ours, name).grad * r ** 2, getattr(theirs, name).grad, msg=name)


def test_in_our_units_converts_the_recipes_bandwidth_and_keeps_a_given_one():
    """The recipe's own bandwidth (THEIR_BANDWIDTH, Anthropic's 2.0) becomes 2.0 / r; a number is the
    user's, already in our units, and stays as given. The tanh scale and lambda_P are always theirs."""
    x = torch.full((4, 9), 1 / 3)                                    # ||x|| = 1, r = sqrt(9) / 1 = 3
    for bandwidth, want in ((THEIR_BANDWIDTH, 2.0 / 3), (0.05, 0.05), (2.0, 2.0)):
        hp = in_our_units({**DEFAULTS, "bandwidth": bandwidth, "lr": 1e-3}, x)
        assert hp == pytest.approx({"bandwidth": want, "tanh_scale": 12.0, "pre_act_coefficient": 1e-6, "lr": 1e-3})
