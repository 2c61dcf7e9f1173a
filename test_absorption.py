"""Tests for absorption.py: a constructed SAE whose absorption is known, k-sparse probing on constructed
latents, the probes against NumPy, the per-word scores against SAEBench's rules written out in NumPy,
and evaluate.py --absorption on the tiny model."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import absorption
import evaluate
import sae_folder
from jumprelu import JumpReLUSAE

LETTERS, PER_LETTER, TRAIN = 4, 10, 6       # letters a-d, 10 words each, the first 6 of them train words
FULL, PARTIAL = 1 * PER_LETTER + 7, (2 * PER_LETTER + 3, 2 * PER_LETTER + 8)   # " b7"; " c3" (train) and " c8"


def _words_and_sae():
    """Word w (letter w // 10) has x = 2 e_letter + e_(4 + w), D = 44. The SAE's latent l < 4 reads and
    writes e_l (f = 2 on its letter's words) and latent 4 + w reads and writes e_(4 + w) (f = 1), except:
    latent 1 ("b") is pushed below its threshold on " b7", which latent 25 takes over in full, reading
    sqrt(5) e_25 and writing (2 e_1 + e_25) / sqrt(5); latent 2 ("c") fires at half strength on " c3" and
    " c8", and latents 27 and 32 carry the other half, writing (e_2 + e_27) / sqrt(2) and (e_2 + e_32) / sqrt(2)
    (with " c3" a train word, the k-sparse probe learns that c's latent at 1 means c). Every word is
    reconstructed exactly."""
    n, d = LETTERS * PER_LETTER, LETTERS + LETTERS * PER_LETTER
    letter_N = torch.arange(n) // PER_LETTER
    x_ND = 2 * F.one_hot(letter_N, d).float() + F.pad(torch.eye(n), (LETTERS, 0))
    sae = JumpReLUSAE(d, d, threshold_init=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.W_enc[LETTERS + FULL, 1] = -10.0
        sae.W_enc[LETTERS + FULL, LETTERS + FULL] = math.sqrt(5)
        sae.W_dec[LETTERS + FULL] = (2 * torch.eye(d)[1] + torch.eye(d)[LETTERS + FULL]) / math.sqrt(5)
        for w in PARTIAL:
            sae.W_enc[LETTERS + w, 2] = -1.0
            sae.W_enc[LETTERS + w, LETTERS + w] = math.sqrt(2)
            sae.W_dec[LETTERS + w] = (torch.eye(d)[2] + torch.eye(d)[LETTERS + w]) / math.sqrt(2)
    assert torch.allclose(sae(x_ND), x_ND, atol=1e-6)
    test = (torch.arange(n) % PER_LETTER) >= TRAIN
    texts = [f" {'abcd'[w // PER_LETTER]}{w % PER_LETTER}" for w in range(n)]
    words = absorption.with_probe({"x_train_ND": x_ND[~test], "letter_train_N": letter_N[~test], "x_test_ND": x_ND[test],
                                   "letter_test_N": letter_N[test], "words_test": [t for t, s in zip(texts, test) if s]})
    return words, sae


def test_a_constructed_sae_absorbs_exactly_the_words_built_to_be_absorbed():
    """" b7" is fully absorbed by latent 25 (absorption fraction 1) and " c8" half (fraction 0.5, not full);
    every other word scores 0. Each letter's main latent is its own; letters without words are left out."""
    words, sae = _words_and_sae()
    result = absorption.measure(sae, words)
    by_letter = {r["letter"]: r for r in result["absorption_by_letter"]}
    for letter, fraction, full, absorbed in (("a", 0, 0, []), ("b", 1 / 4, 1 / 4, [[" b7", LETTERS + FULL]]),
                                             ("c", 0.5 / 4, 0, []), ("d", 0, 0, [])):
        r = by_letter[letter]
        assert r["probe_f1"] == 1.0 and r["probe_true_positives"] == 4, letter
        assert r["main_latents"] == ["abcd".index(letter)], letter
        assert r["absorption_fraction"] == pytest.approx(fraction, abs=1e-6), letter
        assert r["full_absorption_rate"] == pytest.approx(full, abs=1e-6), letter
        assert r["fully_absorbed"] == absorbed, letter
    assert by_letter["b"]["main_f1"] == pytest.approx(2 * 3 / (3 + 4))      # latent 1 misses " b7"
    assert all(by_letter[c]["probe_true_positives"] == 0 and by_letter[c]["absorption_fraction"] is None
               for c in "efghijklmnopqrstuvwxyz")
    assert result["absorption_letters"] == 4
    assert result["absorption_fraction"] == pytest.approx((1 / 4 + 0.5 / 4) / 4, abs=1e-6)
    assert result["full_absorption_rate"] == pytest.approx(1 / 4 / 4, abs=1e-6)


def test_absorption_does_not_depend_on_how_an_sae_splits_scale_between_activations_and_decoder():
    """Activations times c and decoder rows divided by c (a different c for each latent) reconstruct the same:
    the figures are the same."""
    words, sae = _words_and_sae()
    c_F = torch.linspace(0.1, 10.0, sae.d_sae)
    with torch.no_grad():
        sae.W_enc.mul_(c_F), sae.log_threshold.add_(c_F.log())
        sae.W_dec.div_(c_F[:, None])
    scaled = absorption.measure(sae, words)
    assert scaled["absorption_fraction"] == pytest.approx((1 / 4 + 0.5 / 4) / 4, abs=1e-6)
    assert scaled["full_absorption_rate"] == pytest.approx(1 / 4 / 4, abs=1e-6)
    assert [r["main_latents"] for r in scaled["absorption_by_letter"][:4]] == [[0], [1], [2], [3]]


def test_k_sparse_probing_keeps_a_split_letter_and_not_a_gain_below_the_threshold():
    """Letter a is split between latents 0 and 1 (each fires on half its words): both are its main latents
    (F1 from 2/3 to 1). Letter b's latent 2 misses every 25th b word, which latent 3 alone catches: ranked
    second, it would raise F1 from 192/196 to 1, by 0.02 < F1_JUMP, so b keeps latent 2 alone. Latents 4-9
    are noise."""
    rng = np.random.default_rng(0)

    def latents(n):
        letter = np.arange(n) % 2                                    # a, b, a, b, ...
        g = np.zeros((n, 10), dtype=np.float32)
        g[:, 4:] = rng.uniform(0, 1, (n, 6)) * (rng.uniform(size=(n, 6)) < 0.3)
        a_rows, b_rows = np.flatnonzero(letter == 0), np.flatnonzero(letter == 1)
        g[a_rows[::2], 0], g[a_rows[1::2], 1] = 1.0, 1.0
        g[b_rows, 2] = 1.0
        g[b_rows[::25], 2], g[b_rows[::25], 3] = 0.0, 5.0
        return torch.from_numpy(g), F.one_hot(torch.from_numpy(letter), 26).bool()

    (g_train, y_train), (g_test, y_test) = latents(400), latents(200)
    order_LK = absorption.latent_order(g_train, y_train)
    assert set(order_LK[0, :2].tolist()) == {0, 1} and order_LK[1, :2].tolist() == [2, 3]
    main, f1 = absorption.main_latents(g_train, y_train, g_test, y_test, order_LK)
    assert set(main[0]) == {0, 1} and f1[0] == pytest.approx(1.0)
    assert main[1] == [2] and f1[1] == pytest.approx(2 * 96 / (96 + 100))


def _numpy_logistic(x, y, l2, l1=0.0):
    """One balanced logistic regression, the objective of absorption.logistic, solved in float64: by Newton's
    method without l1, by proximal gradient (soft thresholding) with it."""
    n, k = x.shape
    X = np.c_[x, np.ones(n)]
    s = np.where(y, (n - y.sum()) / y.sum(), 1.0)                    # positives weighted by negatives / positives
    reg = np.diag([l2] * k + [0.0])
    theta = np.zeros(k + 1)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    if not l1:
        for _ in range(50):
            p = sigmoid(X @ theta)
            grad = X.T @ (s * (p - y)) / n + reg @ theta
            theta -= np.linalg.solve(X.T @ (X * (s * p * (1 - p))[:, None]) / n + reg, grad)
        return theta[:k], theta[k]
    step = 4 * n / (s.max() * np.linalg.norm(X, 2) ** 2 + 4 * n * l2)
    for _ in range(30000):
        theta -= step * (X.T @ (s * (sigmoid(X @ theta) - y)) / n + reg @ theta)
        theta[:k] = np.sign(theta[:k]) * np.maximum(np.abs(theta[:k]) - step * l1, 0)
    return theta[:k], theta[k]


def _noisy_labels(rng, n=300, k=5, columns=3):
    x = rng.normal(size=(n, k)).astype(np.float32)
    y = (x @ rng.normal(size=(k, columns)) + rng.normal(size=(n, columns)) > 0.5)
    return x, y


def test_the_probe_is_numpys_balanced_logistic_regression():
    """Each column's weights and bias are the optimum of the same objective found by Newton's method in NumPy;
    a masked column's are those of a regression on its unmasked features alone, and 0 elsewhere."""
    rng = np.random.default_rng(1)
    x, y = _noisy_labels(rng)
    W, b = absorption.logistic(torch.from_numpy(x), torch.from_numpy(y), l2=1e-2)
    for l in range(y.shape[1]):
        w_ref, b_ref = _numpy_logistic(x.astype(np.float64), y[:, l], 1e-2)
        np.testing.assert_allclose(W[:, l].numpy(), w_ref, atol=2e-4)
        assert b[l].item() == pytest.approx(b_ref, abs=2e-4)
    mask = torch.from_numpy(rng.uniform(size=(5, 3)) < 0.5)
    mask[0] = True
    W, b = absorption.logistic(torch.from_numpy(x), torch.from_numpy(y), l2=1e-2, mask_KL=mask)
    for l in range(y.shape[1]):
        used = mask[:, l].numpy()
        w_ref, b_ref = _numpy_logistic(x[:, used].astype(np.float64), y[:, l], 1e-2)
        np.testing.assert_allclose(W[used, l].numpy(), w_ref, atol=2e-4)
        assert (W[~used, l] == 0).all() and b[l].item() == pytest.approx(b_ref, abs=2e-4)


def test_the_l1_probe_is_numpys_proximal_gradient_solution():
    """With an L1 penalty the weights are the proximal-gradient optimum, zero where it is zero; the same from
    a sparse CSR input as from a dense one."""
    rng = np.random.default_rng(2)
    x, y = _noisy_labels(rng, k=8)
    x[:, 5:] *= 0.05                                                   # weak features, which the penalty zeroes
    for l1 in (0.01, 0.05):
        W, b = absorption.logistic(torch.from_numpy(x), torch.from_numpy(y), l2=1e-3, l1=l1)
        W_csr, b_csr = absorption.logistic(torch.from_numpy(x).to_sparse_csr(), torch.from_numpy(y), l2=1e-3, l1=l1)
        np.testing.assert_allclose(W_csr.numpy(), W.numpy(), atol=1e-5)
        for l in range(y.shape[1]):
            w_ref, b_ref = _numpy_logistic(x.astype(np.float64), y[:, l], 1e-3, l1=l1)
            np.testing.assert_allclose(W[:, l].numpy(), w_ref, atol=1e-3)
            assert b[l].item() == pytest.approx(b_ref, abs=1e-3)
            assert (np.abs(W[:, l].numpy()[w_ref == 0]) < 1e-6).all()
        assert (W == 0).any()


def _saebench_scores(x, g, W_dec, probe, main):
    """SAEBench's rules for each word, one by one, in NumPy."""
    p = probe / np.linalg.norm(probe)
    cos = W_dec @ p / np.linalg.norm(W_dec, axis=1)
    fractions, fulls = [], []
    for x_n, g_n in zip(x, g):
        proj = g_n * cos
        total, main_proj = x_n @ p, proj[main].sum()
        others = sorted((proj[i] for i in range(len(cos)) if i not in main and cos[i] >= 0.1 and proj[i] > 0),
                        reverse=True)[:3]
        if total <= 0 or main_proj >= total or sum(others) / total < 0.4:
            fraction = 0.0
        elif main_proj <= 0:
            fraction = 1.0
        else:
            absorbed = min(sum(others), total - main_proj)
            fraction = min(max(absorbed / (absorbed + main_proj), 0.0), 1.0)
        top = int(np.argmax(proj))
        full = all(g_n[i] == 0 for i in main) and cos[top] >= 0.025 and total > 0 and proj[top] / total >= 0.4
        fractions.append(fraction)
        fulls.append(full)
    return np.array(fractions), np.array(fulls)


@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(2, 12), st.integers(2, 6))
def test_the_scores_of_each_word_follow_saebenchs_rules(seed, n, f, d):
    """absorption_scores, vectorised, against the rules applied word by word: on reconstructions from a few
    latents (some main latents silent, some aligned with the probe), with noise."""
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(f, d))
    probe = rng.normal(size=d)
    W_dec[: f // 2] += 2 * rng.uniform() * probe                   # some latents aligned with the probe
    main = sorted(rng.choice(f, rng.integers(1, f), replace=False).tolist())
    g = rng.exponential(size=(n, f)) * (rng.uniform(size=(n, f)) < 0.5)
    g[:, main] *= rng.uniform(size=(n, 1)) < 0.5                    # main latents silent on about half the words
    x = g @ (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)) + 0.3 * rng.normal(size=(n, d))
    fraction, full, top = absorption.absorption_scores(*(torch.from_numpy(a) for a in (x, g, W_dec, probe)), main)
    want_fraction, want_full = _saebench_scores(x, g, W_dec, probe, main)
    np.testing.assert_allclose(fraction.numpy(), want_fraction, atol=1e-9)
    assert full.tolist() == want_full.tolist()
    assert (0 <= fraction).all() and (fraction <= 1).all()


def test_a_word_read_after_the_shared_prefix_is_the_word_read_after_it_in_one_sequence(tiny_model, monkeypatch):
    """The cached prefix, repeated for each word of a batch, then the word: the same activation as the whole
    sequence read at once (here with no examples, so the prefix is the newline), in batches of any size."""
    import harvest
    model, tokenizer = harvest.load_model(str(tiny_model), "cpu", torch.float32)
    ids_N, words, letter_N = absorption.vocabulary_words(tokenizer)
    reader = harvest.SiteReader(model, [(1, "resid")])
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    want_ND = reader(torch.tensor([newline + [int(i)] for i in ids_N]))[0][:, -1]
    monkeypatch.setattr(absorption, "EXAMPLES", 0)
    for batch_size in (4, 7, len(ids_N)):
        got_ND = absorption.word_activations(reader, tokenizer, ids_N, letter_N, 0, batch_size)
        torch.testing.assert_close(got_ND, want_ND, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    with_examples_ND = absorption.word_activations(reader, tokenizer, ids_N, letter_N, 0, 8)
    assert with_examples_ND.shape == want_ND.shape and (with_examples_ND - want_ND).norm(dim=1).min() > 1e-3


def test_evaluate_main_measures_absorption_on_the_tiny_model(tiny_acts, tmp_path, capsys):
    """evaluate.py --absorption on the tiny model's own vocabulary: the table, a record with every letter's
    figures in --json, and the bar plot in --plot's folder."""
    sae_folder.save(JumpReLUSAE(32, 64, threshold_init=1e-3), tmp_path / "sae")
    evaluate.main([str(tmp_path / "sae"), "--acts", str(tiny_acts), "--absorption", "--json", str(tmp_path / "e.json"),
                   "--plot", str(tmp_path / "plots"), "--device", "cpu"])
    printed = capsys.readouterr().out
    (record,) = json.loads((tmp_path / "e.json").read_text())
    assert [r["letter"] for r in record["absorption_by_letter"]] == list(absorption.LETTERS)
    for r in record["absorption_by_letter"]:
        assert set(r) == {"letter", "probe_f1", "probe_true_positives", "main_latents", "main_f1",
                          "absorption_fraction", "full_absorption_rate", "fully_absorbed"}
        assert 1 <= len(r["main_latents"]) <= absorption.MAX_K and 0 <= r["probe_f1"] <= 1
    assert printed.splitlines()[0].split()[-2:] == ["absorption_fraction", "full_absorption_rate"]
    assert "absorption of sae, mean over the" in printed and (tmp_path / "plots" / "absorption.png").stat().st_size > 0
