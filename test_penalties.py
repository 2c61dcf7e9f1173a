"""Tests for penalties.py: the later recipes' sparsity penalties and the JumpReLU training loss that
takes one, against test_jumprelu.py's NumPy reference, by hand, and against the paper's own loss.

    python -m pytest test_penalties.py
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import penalties
from jumprelu import JumpReLUSAE
from test_jumprelu import DEVICES, assert_matches, dyadic_sae, ref_sae, sae_from, trained_looking_sae

PENALTIES = {"l0": lambda K: penalties.paper, "target_row": penalties.target_row, "target_batch": penalties.target_batch}


@given(case=dyadic_sae())
def test_the_paper_penalty_is_the_papers_own_loss_bit_for_bit(case):
    """penalties.loss with the paper's penalty, on the dense path, is JumpReLUSAE.loss: the same loss,
    terms and gradients, bit for bit (train.py trains the paper's loss through it)."""
    p, x, lam, eps, pre_bias = case
    results = []
    for loss in (lambda sae, x: sae.loss(x, lam), lambda sae, x: penalties.loss(sae, x, lam)):
        sae = sae_from(p, eps, pre_bias)
        out = loss(sae, torch.tensor(x))
        out["loss"].backward()
        results.append((out, {name: q.grad for name, q in sae.named_parameters()}))
    (paper, paper_grads), (ours, our_grads) = results
    for key in ("loss", "mse", "l0", "pre", "f", "x_hat"):
        assert torch.equal(ours[key], paper[key]), key
    for name, grad in paper_grads.items():
        assert torch.equal(our_grads[name], grad), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("penalty", ["l0", "target_row", "target_batch"])
@given(case=dyadic_sae(), target=st.integers(1, 6))
def test_loss_and_every_gradient_of_each_penalty(device, sparse, penalty, case, target):
    """Both paths against the reference; the thresholds sit at pre-activations, at the window's
    edges and inside it, so the sparse path must keep the in-window entries below theta too."""
    p, x, lam, eps, pre_bias = case
    sae = sae_from(p, eps, pre_bias, device)
    # The reference uses the thresholds the model actually holds (exp of a float64 log).
    p = {**p, "theta": sae.threshold.detach().cpu().numpy()}
    ref, ref_grads = ref_sae(p, x, lam, eps, pre_bias, penalty, target)
    out = penalties.loss(sae, torch.tensor(x, device=device), lam, penalty=PENALTIES[penalty](target), sparse=sparse)
    if not sparse:
        np.testing.assert_array_equal(out["f"].detach().cpu().numpy(), ref["f"])
    np.testing.assert_array_equal(out["fired"].cpu().numpy(), (ref["f"] != 0).any(0))
    assert_matches(sae, out, ref, ref_grads)


@pytest.mark.parametrize("penalty, target, value", [
    ("l0", None, 1.5),
    ("target_row", 4, 0.5 * ((1 - 4) ** 2 + (2 - 4) ** 2) / 2),
    ("target_batch", 4, 0.5 * (1.5 - 4) ** 2),
])
def test_each_penalty_by_hand(penalty, target, value):
    """Two rows through an identity SAE with theta = 0.5: f = [1, 0] and [2, 3], L0 1 and 2. With
    K = 4 (so 2/K = 1/2): target_row averages the rows' (2/K)(L0 - K)^2, target_batch squares the
    mean L0's distance."""
    sae = JumpReLUSAE(2, 2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)), sae.W_dec.copy_(torch.eye(2)), sae.log_threshold.fill_(math.log(0.5))
    x = torch.tensor([[1.0, 0.25], [2.0, 3.0]], dtype=torch.float64)
    out = penalties.loss(sae, x, 0.5, penalty=PENALTIES[penalty](target))
    assert out["l0"].item() == 1.5 and out["mse"].item() == 0.25**2 / 2       # x_hat = f
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.5 * value, rel=1e-12)


def test_target_batch_takes_its_mean_from_batch_mean():
    """target_batch's mean L0 is the one `batch_mean` gives (train.py passes the mean over every
    torchrun rank's rows): here a stand-in that reports another batch's mean of 4, so the penalty
    is zero at K = 4 while this batch's own mean L0 is 1.5."""
    sae = JumpReLUSAE(2, 2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)), sae.W_dec.copy_(torch.eye(2)), sae.log_threshold.fill_(math.log(0.5))
    x = torch.tensor([[1.0, 0.25], [2.0, 3.0]], dtype=torch.float64)
    out = penalties.loss(sae, x, 0.5, penalty=penalties.target_batch(4, lambda l0_B: l0_B.mean() + 2.5))
    assert out["l0"].item() == 1.5 and out["loss"].item() == out["mse"].item()


def test_dense_loss_takes_any_leading_dimensions():
    """The dense path takes x of shape [..., d_in]: a [2, 3, d_in] batch gives the loss, MSE, L0 and
    fired latents of its 6 rows, the dead-threshold pull included."""
    sae, x_BD = trained_looking_sae(7, B=6)
    dead_F = torch.arange(sae.d_sae) % 3 == 0
    for penalty in (penalties.paper, penalties.target_row(4), penalties.target_batch(4)):
        rows = penalties.loss(sae, x_BD, 0.5, dead_F, penalty=penalty, dead_pull=0.1)
        nested = penalties.loss(sae, x_BD.view(2, 3, -1), 0.5, dead_F, penalty=penalty, dead_pull=0.1)
        for key in ("loss", "mse", "l0", "fired"):
            torch.testing.assert_close(nested[key], rows[key], msg=key)


def test_dead_pull_acts_only_on_latents_marked_dead():
    """dead_pull adds dead_pull * log theta summed over the latents dead_F marks; without a mask, or
    with none marked, the loss is unchanged."""
    sae, x_BD = trained_looking_sae(8)
    base = penalties.loss(sae, x_BD, 0.5)["loss"]
    assert penalties.loss(sae, x_BD, 0.5, None, dead_pull=0.1)["loss"] == base
    assert penalties.loss(sae, x_BD, 0.5, torch.zeros(sae.d_sae, dtype=torch.bool), dead_pull=0.1)["loss"] == base
    dead_F = torch.arange(sae.d_sae) < 3
    torch.testing.assert_close(penalties.loss(sae, x_BD, 0.5, dead_F, dead_pull=0.1)["loss"],
                               base + 0.1 * sae.log_threshold[:3].sum())


def test_the_dead_threshold_pull_lowers_a_dead_latents_threshold():
    """A latent whose pre-activations never reach its kernel window gets no estimator gradient; the
    pull adds exactly dead_pull to its log-threshold's gradient, so a step lowers the threshold."""
    sae = JumpReLUSAE(8, 16, bandwidth=0.05)
    with torch.no_grad():
        sae.log_threshold[0] = 5.0                                   # theta = 148: never reached
    dead_F = torch.arange(16) == 0
    penalties.loss(sae, torch.randn(64, 8), 1e-3, dead_F, dead_pull=0.01)["loss"].backward()
    assert sae.log_threshold.grad[0].item() == pytest.approx(0.01)
    before = sae.log_threshold[0].item()
    torch.optim.Adam(sae.parameters(), lr=1e-2).step()
    assert sae.log_threshold[0].item() < before
