"""Tests for sparse.py: the sparse path gives the dense path's loss and gradients from the entries
that can matter (its NumPy-reference test is test_penalties.py's, on both paths).

    python -m pytest test_sparse.py
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import penalties
from jumprelu import JumpReLUSAE
from sparse import sparse_terms
from test_jumprelu import trained_looking_sae, zero_threshold_sae


def _loss_and_grads(sae, x_BD, lam, target, sparse):
    sae.zero_grad(set_to_none=True)
    penalty = penalties.paper if target is None else penalties.target_row(target)
    out = penalties.loss(sae, x_BD, lam, penalty=penalty, sparse=sparse)
    out["loss"].backward()
    return out, {name: q.grad.clone() for name, q in sae.named_parameters()}


@given(seed=st.integers(0, 2**31), pre_bias=st.booleans(), target=st.sampled_from([None, 8]),
       lam=st.floats(0, 1))
def test_sparse_path_equals_dense_path(seed, pre_bias, target, lam):
    sae, x_BD = trained_looking_sae(seed, pre_bias=pre_bias)
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
    sae, x_BD = trained_looking_sae(0, pre_bias=True)
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
    sae, x_BD = trained_looking_sae(1)
    results = []
    for sparse in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = penalties.loss(sae, x_BD, 0.1, sparse=sparse)
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
    sae, x_BD = trained_looking_sae(2, B=2048, l0=64)
    first = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)[1]
    for _ in range(3):
        again = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)[1]
        for name, grad in first.items():
            assert torch.equal(again[name], grad), name


def test_sparse_path_takes_a_batch_of_rows():
    sae = JumpReLUSAE(4, 8)
    with pytest.raises(ValueError, match="batch of rows"):
        penalties.loss(sae, torch.randn(2, 3, 4), 0.1, sparse=True)


def test_sparse_path_keeps_the_entries_above_theta_less_three_quarters_of_epsilon():
    """The kept entries are those with pre > theta - 3/4 epsilon, strictly: every active latent,
    every one inside its window, a quarter bandwidth of margin, and none further below.
    `kept` is their fraction (bench.py reports it per row)."""
    sae = JumpReLUSAE(1, 4, bandwidth=0.125, dtype=torch.float64)
    with torch.no_grad():                                     # theta 0.5, eps 1/8: floor 0.40625
        sae.W_enc.copy_(torch.tensor([[0.75, 0.46875, 0.40625, 0.3125]], dtype=torch.float64))
        sae.log_threshold.fill_(math.log(0.5))
    assert sae.threshold.eq(0.5).all()
    out = penalties.loss(sae, torch.ones(1, 1, dtype=torch.float64), 0.1, sparse=True)
    # active, in the window, exactly at the floor, and 1.5 epsilon below theta: the first two are kept
    assert out["kept"] == 2 / 4 and out["l0"].item() == 1


@pytest.mark.parametrize("trained", ["x", "W_enc", "b_enc"])
def test_sparse_path_gradient_reaches_whatever_alone_requires_one(trained):
    """With the rest of the SAE frozen, the input (as for attribution), W_enc or b_enc alone gets
    the dense path's gradient from the sparse path."""
    sae, x_BD = trained_looking_sae(3)
    sae.requires_grad_(False)
    tensors = {"x": x_BD.clone(), "W_enc": sae.W_enc, "b_enc": sae.b_enc}
    tensors[trained].requires_grad_(True)
    grads = []
    for sparse in (False, True):
        tensors[trained].grad = None
        penalties.loss(sae, tensors["x"], 0.5, sparse=sparse)["loss"].backward()
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
    float32_sae, x_BD = trained_looking_sae(4, pre_bias=pre_bias)
    sae = JumpReLUSAE(float32_sae.d_in, float32_sae.d_sae, bandwidth=float32_sae.bandwidth, dtype=model_dtype,
                      pre_encoder_bias=pre_bias)
    sae.load_state_dict(float32_sae.state_dict())
    results = []
    for sparse in (False, True):
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = penalties.loss(sae, x_BD, 0.1, sparse=sparse)
        out["loss"].backward()
        results.append((out, {name: q.grad.clone() for name, q in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    assert sparse["l0"].item() == dense["l0"].item()
    for name, grad in dense_grads.items():
        err = (sparse_grads[name].float() - grad.float()).norm() / grad.float().norm()
        assert err < 2e-2, (name, err.item())


def test_sparse_terms_called_alone_follows_the_paper():
    """sparse_terms sends the L0 estimator's gradient to the thresholds only, as the paper's loss does."""
    sae, x_BD = trained_looking_sae(5)
    sparse_terms(sae, x_BD, sae.threshold)["l0_rows"].sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or not grad.any(), name
    assert sae.log_threshold.grad.any()


def test_sparse_path_allocates_on_the_device_of_its_inputs():
    """The sparse path's own tensors (L0, fired, the bags' offsets, b_enc's gradient) go on the
    inputs' device, not torch's default one: under a default of meta (as under a user's
    set_default_device("cuda")) a CPU SAE gives the same loss and gradients, bit for bit."""
    sae, x_BD = trained_looking_sae(6, pre_bias=True)
    out, grads = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)
    with torch.device("meta"):
        again, again_grads = _loss_and_grads(sae, x_BD, 0.5, None, sparse=True)
    for key in ("loss", "l0", "x_hat", "fired"):
        assert torch.equal(again[key], out[key]), key
    for name, grad in grads.items():
        assert torch.equal(again_grads[name], grad), name


def test_a_threshold_of_zero_on_the_sparse_path():
    """Latents whose theta is 0 (log_threshold -inf) give the dense path's loss and gradients there."""
    sae = zero_threshold_sae()
    x_BD = torch.randn(5, 3)
    dense, dense_grads = _loss_and_grads(sae, x_BD, 0.1, None, sparse=False)
    sparse, sparse_grads = _loss_and_grads(sae, x_BD, 0.1, None, sparse=True)
    assert torch.equal(sparse["fired"], dense["fired"]) and sparse["l0"].item() == dense["l0"].item() == 2
    for name, grad in dense_grads.items():
        assert torch.isfinite(sparse_grads[name]).all()
        torch.testing.assert_close(sparse_grads[name], grad, msg=name)
