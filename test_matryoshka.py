"""Tests for matryoshka.py: the Matryoshka loss against a NumPy reference written from its definition
(docs/maths.md section 3.4), for JumpReLU (thresholds at the window's edges, as for the paper's
loss) and BatchTopK, and a Matryoshka SAE through train, evaluate, export and the SAELens folder.

    python -m pytest test_matryoshka.py
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import matryoshka
import penalties
from baselines import BatchTopKSAE
from test_jumprelu import DEVICES, assert_matches, dyadic_sae, ref_H, ref_K, sae_from


def ref_matryoshka_jumprelu(p, x, lam, eps, pre_bias, sizes, target=None):
    """The Matryoshka JumpReLU loss and every parameter's gradient, by hand: each prefix m of `sizes`
    decoded on its own, x_hat_m = f[:, :m] @ W_dec[:m] + b_dec, its squared error averaged over the
    rows, the mean of them over the prefixes, plus lam * S once, S the paper's mean L0 (target None) or the small
    recipe's (2/K)(mean L0 - K)^2 for K = target. The estimators are the paper's: d f/d pre =
    H(pre - theta), d f/d theta = -(theta/eps) K((pre - theta)/eps), d L0/d theta = -(1/eps) K(...)."""
    B = x.shape[0]
    theta, W_dec = p["theta"], p["W_dec"]
    x_in = x - p["b_dec"] if pre_bias else x
    pre = x_in @ p["W_enc"] + p["b_enc"]
    active = ref_H(pre - theta)
    f = pre * active
    kernel = ref_K((pre - theta) / eps)
    errors, d_f, d_W_dec, d_b_dec = [], np.zeros_like(f), np.zeros_like(W_dec), np.zeros_like(p["b_dec"])
    for m in sizes:
        x_hat = f[:, :m] @ W_dec[:m] + p["b_dec"]
        errors.append(((x - x_hat) ** 2).sum(1).mean())
        d_x_hat = 2.0 * (x_hat - x) / (B * len(sizes))      # d(this prefix's error / n)/d x_hat_m
        d_f[:, :m] += d_x_hat @ W_dec[:m].T
        d_W_dec[:m] += f[:, :m].T @ d_x_hat
        d_b_dec += d_x_hat.sum(0)
    l0 = active.sum(1).mean()
    S, dS_dl0 = (l0, 1.0) if target is None else ((2.0 / target) * (l0 - target) ** 2, (4.0 / target) * (l0 - target))
    d_pre = d_f * active
    d_theta = (d_f * -(theta / eps) * kernel).sum(0) + (lam / B) * dS_dl0 * (-(1.0 / eps) * kernel).sum(0)
    grads = {"W_dec": d_W_dec, "b_dec": d_b_dec - (d_pre.sum(0) @ p["W_enc"].T if pre_bias else 0.0),
             "W_enc": x_in.T @ d_pre, "b_enc": d_pre.sum(0), "log_threshold": theta * d_theta}
    out = {"f": f, "x_hat": x_hat, "mse": errors[-1], "l0": l0, "loss": np.mean(errors) + lam * S,
           "prefix_mse": np.array(errors[:-1])}
    return out, grads


@st.composite
def nested(draw, d_sae):
    """Prefix sizes: an increasing draw from 1 .. d_sae - 1, then d_sae."""
    inner = draw(st.lists(st.integers(1, d_sae - 1), min_size=1, max_size=d_sae - 1, unique=True))
    return sorted(inner) + [d_sae]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", [None, 3], ids=["paper", "target_batch"])
@given(case=dyadic_sae(), data=st.data())
def test_matryoshka_jumprelu_loss_and_every_gradient(device, target, case, data):
    """The loss, each prefix's error and every gradient against the reference; the thresholds sit at
    pre-activations, at the window's edges and inside it. Fails if a prefix's error is dropped, if the
    prefixes are decoded as disjoint groups rather than nested, or if the kernel term is lost."""
    p, x, lam, eps, pre_bias = case
    assume(p["W_enc"].shape[1] >= 2)
    sizes = data.draw(nested(p["W_enc"].shape[1]))
    sae = sae_from(p, eps, pre_bias, device)
    p = {**p, "theta": sae.threshold.detach().cpu().numpy()}     # the thresholds the model holds
    ref, ref_grads = ref_matryoshka_jumprelu(p, x, lam, eps, pre_bias, sizes, target)
    penalty = penalties.paper if target is None else penalties.target_batch(target)
    out = matryoshka.loss(penalties.loss, sizes)(sae, torch.tensor(x, device=device), lam, penalty=penalty)
    np.testing.assert_array_equal(out["f"].detach().cpu().numpy(), ref["f"])
    assert_matches(sae, out, ref, ref_grads, keys=("x_hat", "mse", "l0", "loss", "prefix_mse"))


def test_hand_computed_two_prefixes():
    """d_in 1, two latents both active; prefixes [1, 2]: errors (x - f1 w1 - b)^2 and (x - f1 w1 - f2 w2 - b)^2,
    the loss their mean."""
    sae = sae_from(dict(W_enc=np.array([[1.0, 0.5]]), b_enc=np.zeros(2), W_dec=np.array([[1.0], [2.0]]),
                        b_dec=np.array([0.25]), theta=np.array([0.5, 0.25])), eps=0.125, pre_bias=False)
    out = matryoshka.loss(penalties.loss, [1, 2])(sae, torch.tensor([[2.0]], dtype=torch.float64), 0.0)
    # pre = (2, 1), both above threshold; prefix 1: 2 - 2*1 - 0.25; prefix 2: 2 - (2 + 2) - 0.25
    assert out["prefix_mse"].tolist() == [0.0625] and out["mse"].item() == 2.25 ** 2
    assert out["loss"].item() == (0.0625 + 2.25 ** 2) / 2


def ref_batchtopk(p, x, k, sizes):
    """BatchTopK's training forward (the k * B largest pre-activations of the batch, ReLU'd; the encoder
    sees x - b_dec) and the Matryoshka loss (the mean of the prefixes' errors) with no dead latents,
    with every gradient by hand."""
    B = x.shape[0]
    W_dec = p["W_dec"]
    x_in = x - p["b_dec"]
    pre = x_in @ p["W_enc"] + p["b_enc"]
    kept = np.zeros(pre.size, dtype=bool)
    kept[np.argsort(-pre, axis=None)[:k * B]] = True
    mask = kept.reshape(pre.shape) & (pre > 0)
    f = np.where(mask, pre, 0.0)
    errors, d_f, d_W_dec, d_b_dec = [], np.zeros_like(f), np.zeros_like(W_dec), np.zeros_like(p["b_dec"])
    for m in sizes:
        x_hat = f[:, :m] @ W_dec[:m] + p["b_dec"]
        errors.append(((x - x_hat) ** 2).sum(1).mean())
        d_x_hat = 2.0 * (x_hat - x) / (B * len(sizes))
        d_f[:, :m] += d_x_hat @ W_dec[:m].T
        d_W_dec[:m] += f[:, :m].T @ d_x_hat
        d_b_dec += d_x_hat.sum(0)
    d_pre = d_f * mask
    grads = {"W_dec": d_W_dec, "b_dec": d_b_dec - d_pre.sum(0) @ p["W_enc"].T, "W_enc": x_in.T @ d_pre,
             "b_enc": d_pre.sum(0)}
    return {"x_hat": x_hat, "mse": errors[-1], "loss": np.mean(errors), "prefix_mse": np.array(errors[:-1])}, grads


@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), data=st.data())
def test_matryoshka_batchtopk_loss_and_every_gradient(seed, k, data):
    """BatchTopK, the peers' Matryoshka baseline: the same loss around its own activation."""
    rng = np.random.default_rng(seed)
    D, F, B = 5, 8, 6
    p = dict(W_enc=rng.normal(size=(D, F)), b_enc=rng.normal(size=F) * 0.1, W_dec=rng.normal(size=(F, D)),
             b_dec=rng.normal(size=D) * 0.1)
    x = rng.normal(size=(B, D))
    sizes = data.draw(nested(F))
    sae = BatchTopKSAE(D, F, k, dtype=torch.float64)
    with torch.no_grad():
        for name, value in p.items():
            getattr(sae, name).copy_(torch.tensor(value))
    ref, ref_grads = ref_batchtopk(p, x, k, sizes)
    out = matryoshka.loss(type(sae).loss, sizes)(sae, torch.tensor(x))
    assert_matches(sae, out, ref, ref_grads, keys=("x_hat", "mse", "loss", "prefix_mse"))


@pytest.mark.parametrize("sizes, d_sae, expected", [([4, 16], 64, [4, 16, 64]), ([1, 63, 64], 64, [1, 63, 64])])
def test_prefixes_end_at_d_sae(sizes, d_sae, expected):
    assert matryoshka.prefixes(sizes, d_sae) == expected


@pytest.mark.parametrize("sizes", [[16, 4], [4, 4, 16], [0, 16], [64], [4, 65], [-1, 8], []])
def test_prefixes_that_are_not_nested_in_the_latents_are_refused(sizes):
    with pytest.raises(ValueError, match=r"--matryoshka .* increasing order"):
        matryoshka.prefixes(sizes, 64)


def test_a_matryoshka_sae_trains_saves_evaluates_exports_and_round_trips_through_saelens(tiny_acts, tmp_path, capsys):
    """From the command line: train.py records the prefixes in config.json and each proper prefix's
    MSE in the log; evaluate.py, export.py (verified in onnxruntime) and the SAELens folder take the
    SAE as any JumpReLU SAE, and the SAELens round trip keeps the prefixes and the encoder."""
    import evaluate
    import export
    import formats
    import train
    out = tmp_path / "sae"
    train.main(["--acts", str(tiny_acts), "--out", str(out), "--d-sae", "64", "--target-l0", "6", "--steps", "12",
                "--batch-size", "128", "--log-every", "4", "--matryoshka", "8", "16", "--device", "cpu"])
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "jumprelu" and config["matryoshka"] == [8, 16, 64]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "prefix_mse" in r]
    assert len(steps) == 3 and all(len(r["prefix_mse"]) == 2 for r in steps)
    assert all(r["prefix_mse"][0] >= r["prefix_mse"][1] >= 0 for r in steps)   # fewer latents, no better
    evaluate.main([str(out), "--acts", str(tiny_acts), "--json", str(tmp_path / "eval.json")])
    record, = json.loads((tmp_path / "eval.json").read_text())
    assert record["architecture"] == "jumprelu" and 0 < record["fvu"] < 1
    export.main([str(out), "--out", str(tmp_path / "encoder.onnx")])         # exits non-zero unless onnxruntime agrees
    formats.main([str(out), "--out", str(tmp_path / "saelens"), "--saelens"])
    sae, back = formats.load_sae(out), formats.load_sae(tmp_path / "saelens")
    assert back.metadata["matryoshka"] == [8, 16, 64]
    x = torch.randn(32, sae.d_in)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    capsys.readouterr()


def test_the_same_command_with_resume_carries_a_matryoshka_run_on(tiny_acts, tmp_path, capsys):
    """The prefixes given as they were (d_sae left out) do not contradict those recorded; others do."""
    import train
    argv = ["--acts", str(tiny_acts), "--out", str(tmp_path / "sae"), "--d-sae", "64", "--target-l0", "6",
            "--batch-size", "128", "--device", "cpu", "--matryoshka", "8", "16"]
    train.main([*argv, "--steps", "2"])
    train.main([*argv, "--steps", "4", "--resume"])
    assert f"resuming {tmp_path / 'sae'} at step 2 of 4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--matryoshka \[8, 32, 64\] contradicts the \[8, 16, 64\]"):
        train.main([*argv[:-1], "32", "--steps", "6", "--resume"])


@pytest.mark.parametrize("extra, message", [
    (["--arch", "topk"], "--matryoshka trains JumpReLU and BatchTopK SAEs"),
    (["--path", "sparse"], "--matryoshka trains on the dense path"),
    (["--matryoshka", "32", "8"], "increasing order")])
def test_train_refuses_matryoshka_where_it_cannot_train(tiny_acts, tmp_path, extra, message):
    import train
    argv = ["--acts", str(tiny_acts), "--out", str(tmp_path / "sae"), "--d-sae", "64", "--target-l0", "6",
            "--matryoshka", "8", "16"] + extra
    with pytest.raises(SystemExit, match=message):
        train.main(argv)
    assert not (tmp_path / "sae").exists()
