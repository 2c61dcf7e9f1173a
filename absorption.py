"""Feature absorption, measured offline (Chanin et al. 2024, "A is for Absorption", arXiv 2409.14507;
SAEBench's absorption evaluation).

    python evaluate.py runs/sae_l0_32 --acts runs/acts --absorption --json runs/eval.json --plot runs/plots

When an SAE has a latent for "the word starts with L", does it fire on every word that starts with
L, or has some other latent, one for a particular word, taken the letter over on that word? On the
single-token words of the model's own vocabulary (a space, then ASCII letters), each read at the
SAE's layer and site after ten in-context examples "<word> has the first letter: <W>":

1. a logistic probe learns each first letter from the model's activations on 80% of the words;
2. k-sparse probing picks each letter's main latents: the latents ranked by an L1-penalised probe
   on the SAE's latents, the first k of them kept while each one more raises a k-sparse probe's F1
   on the other 20% of the words by more than 0.03 (k at most 10);
3. on those 20%, the words of letter L that the probe gets right (its true positives) are scored:
   absorption fraction   the share of the probe's projection that latents other than the main ones
                         (at most 3, each with cosine >= 0.1 to the probe) carry in their place,
                         when they carry at least 40% of it; 1 when the main latents are silent
   full absorption       the main latents are silent and one latent (cosine >= 0.025 to the probe)
                         carries at least 40% of the probe's projection
   Each letter's figure is their mean over its probe true positives; the SAE's, the mean over the
   letters whose probe has F1 > 0.6. docs/evaluate-and-export.md has the definitions in full.

Tensors: N words, D model width, F latents, L letters (26), K probe features.
"""

import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import harvest

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE, EXAMPLES, TEST_FRACTION = " has the first letter:", 10, 0.2   # SAEBench's prompt, its 10 examples, its 80/20 split
PROBE_L2, PROBE_ITERS = 1e-4, 100     # the probes' L2 penalty (SAEBench's weight decay), L-BFGS-B iterations
RANK_L1, RANK_L2, RANK_ITERS = 0.01, 1e-6, 100     # the ranking probe on the latents: SAEBench's penalties
MAX_K, F1_JUMP = 10, 0.03       # k-sparse probing: a k is kept while its F1 beats the last kept one's by more than this
MIN_PROBE_F1 = 0.6              # letters whose probe scores less are left out of the SAE's mean
FRACTION_COS, MAX_ABSORBERS = 0.1, 3     # absorption fraction: latents aligned with the probe, at most 3 of them
FULL_COS = 0.025                # full absorption: the one latent's cosine with the probe
SHARE = 0.4                     # both: the share of the probe's projection the absorbing latents must carry


@torch.no_grad()
def measure(sae, words):
    """Feature absorption of `sae` on `words` (collect's): the mean absorption fraction and full-absorption
    rate over the letters whose probe has F1 > MIN_PROBE_F1, and each letter's figures."""
    g_train_NF, g_test_NF = (contributions(sae, words[k]) for k in ("x_train_ND", "x_test_ND"))
    y_train_NL, y_test_NL = (F.one_hot(words[k], len(LETTERS)).bool() for k in ("letter_train_N", "letter_test_N"))
    order_LK = latent_order(g_train_NF, y_train_NL)
    main, main_f1_L = main_latents(g_train_NF, y_train_NL, g_test_NF, y_test_NL, order_LK)
    probe_NL = words["x_test_ND"] @ words["probe_DL"] + words["probe_bias_L"]
    probe_f1_L = f1_scores(probe_NL > 0, y_test_NL)
    W_dec_FD = sae.W_dec.detach().float().cpu()
    letters = []
    for l, letter in enumerate(LETTERS):
        tp_N = y_test_NL[:, l] & (probe_NL[:, l] > 0)
        fraction_N, full_N, top_N = absorption_scores(words["x_test_ND"][tp_N], g_test_NF[tp_N], W_dec_FD,
                                                      words["probe_DL"][:, l], main[l])
        n, texts = int(tp_N.sum()), [w for w, tp in zip(words["words_test"], tp_N.tolist()) if tp]
        letters.append({"letter": letter, "probe_f1": float(probe_f1_L[l]), "probe_true_positives": n,
                        "main_latents": main[l], "main_f1": float(main_f1_L[l]),
                        "absorption_fraction": float(fraction_N.mean()) if n else None,
                        "full_absorption_rate": float(full_N.float().mean()) if n else None,
                        "fully_absorbed": [[w, int(t)] for w, t, full in zip(texts, top_N, full_N) if full]})
    kept = [r for r in letters if r["probe_f1"] > MIN_PROBE_F1 and r["probe_true_positives"]]
    mean = lambda key: float(np.mean([r[key] for r in kept])) if kept else None
    return {"absorption_fraction": mean("absorption_fraction"), "full_absorption_rate": mean("full_absorption_rate"),
            "absorption_letters": len(kept), "absorption_by_letter": letters}


def contributions(sae, x_ND, batch_size=4096):
    """g = f * ||W_dec row||: each latent's contribution to x_hat, in the activations' units, whatever
    scale the SAE splits between its activations and its decoder rows."""
    norm_F = sae.W_dec.detach().float().norm(dim=1).cpu()
    return torch.cat([sae.encode(x_ND[i:i + batch_size]).float().cpu() * norm_F for i in range(0, len(x_ND), batch_size)])


def latent_order(g_NF, y_NL):
    """Each letter's MAX_K best latents, best first [L, MAX_K]: the largest weights of a logistic probe on
    all the latents with an L1 penalty, which leaves few of them non-zero (SAEBench's ranking)."""
    with warnings.catch_warnings():          # on the latents as a sparse CSR matrix, which torch calls beta
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        W_FL, _ = logistic(g_NF.to_sparse_csr(), y_NL, l2=RANK_L2, l1=RANK_L1, max_iter=RANK_ITERS)
    return W_FL.argsort(dim=0, descending=True, stable=True)[:MAX_K].T


def main_latents(g_train_NF, y_train_NL, g_test_NF, y_test_NL, order_LK):
    """k-sparse probing: for k = 1..MAX_K, a logistic probe for each letter on its first k latents (fitted on
    the train words, scored by F1 on the test words); a letter's main latents are its first k, for the last k
    of the run from k = 1 in which each F1 beats the last kept one by more than F1_JUMP. Returns the main
    latents of each letter and their probe's F1."""
    f1_KL = []
    for k in range(1, order_LK.shape[1] + 1):
        columns, where = order_LK[:, :k].flatten().unique(return_inverse=True)   # the latents any letter uses
        mask_KL = torch.zeros(len(columns), len(LETTERS), dtype=torch.bool)
        mask_KL[where.view(len(LETTERS), k), torch.arange(len(LETTERS))[:, None]] = True
        W_KL, b_L = logistic(g_train_NF[:, columns], y_train_NL, mask_KL=mask_KL)
        f1_KL.append(f1_scores(g_test_NF[:, columns] @ W_KL + b_L > 0, y_test_NL))
    main, main_f1 = [], []
    for l in range(len(LETTERS)):
        best, k = -1.0, 0
        while k < len(f1_KL) and f1_KL[k][l] > best + F1_JUMP:
            best, k = float(f1_KL[k][l]), k + 1
        main.append(order_LK[l, :k].tolist())
        main_f1.append(best)
    return main, main_f1


def absorption_scores(x_ND, g_NF, W_dec_FD, probe_D, main):
    """For each word (probe true positives of one letter): its absorption fraction, whether it is fully
    absorbed, and the latent that projects most on the probe. A latent's projection is its contribution
    to x_hat along the probe's unit direction p, g_i cos(W_dec_i, p); the word's is x . p."""
    p_D = probe_D / probe_D.norm()
    cos_F = W_dec_FD @ p_D / W_dec_FD.norm(dim=1).clamp(min=1e-12)
    proj_NF = g_NF * cos_F
    total_N = x_ND @ p_D
    is_main_F = torch.zeros(len(cos_F), dtype=torch.bool)
    is_main_F[main] = True
    main_N = proj_NF[:, is_main_F].sum(1)
    # Absorption fraction: up to MAX_ABSORBERS other latents aligned with the probe make up what the main ones miss.
    others_NF = proj_NF.clamp(min=0) * (~is_main_F & (cos_F >= FRACTION_COS))
    absorbers_N = others_NF.topk(min(MAX_ABSORBERS, len(cos_F)), dim=1).values.sum(1)
    absorbed_N = torch.minimum(absorbers_N, total_N - main_N)
    fraction_N = torch.where(main_N <= 0, 1.0, absorbed_N / (absorbed_N + main_N)).clamp(0, 1)
    fraction_N = torch.where((main_N < total_N) & (absorbers_N >= SHARE * total_N) & (total_N > 0), fraction_N, 0.0)
    # Full absorption: the main latents are silent and the one latent projecting most carries the letter.
    top_N = proj_NF.argmax(1)
    top_proj_N = proj_NF.gather(1, top_N[:, None])[:, 0]
    silent_N = (g_NF[:, is_main_F] == 0).all(1)
    full_N = silent_N & (cos_F[top_N] >= FULL_COS) & (total_N > 0) & (top_proj_N >= SHARE * total_N)
    return fraction_N, full_N, top_N


def logistic(x_NK, y_NL, *, l2=PROBE_L2, l1=0.0, mask_KL=None, max_iter=PROBE_ITERS):
    """Logistic regressions of each column of y_NL (booleans) on the columns of x_NK (dense, or sparse CSR),
    fitted together, as SAEBench's probes. Column l minimises the mean over rows of the cross-entropy, the
    positives weighted by negatives / positives (balanced classes), plus l2/2 ||w_l||^2 + l1 ||w_l||_1, with
    w_l zero where mask_KL[:, l] is False; scipy's L-BFGS-B, `max_iter` iterations at most, with the L1 term
    written as w = u - v, u, v >= 0. Returns W [K, L], b [L]."""
    from scipy.optimize import Bounds, minimize
    y_NL = y_NL.float()
    (N, K), L = x_NK.shape, y_NL.shape[1]
    pos_weight_L = (N - y_NL.sum(0)) / y_NL.sum(0).clamp(min=1)
    xT_KN = x_NK.t().to_sparse_csr() if x_NK.layout == torch.sparse_csr else x_NK.T
    mask_KL = torch.ones(K, L, dtype=torch.bool) if mask_KL is None else mask_KL
    n = int(mask_KL.sum())                       # the weights fitted; then the L biases

    def weights(v):
        W_KL = torch.zeros(K, L)
        W_KL[mask_KL] = torch.from_numpy(v[:n] - v[n:2 * n] if l1 else v[:n]).float()
        return W_KL, torch.from_numpy(v[-L:]).float()

    def loss(v):                                 # the loss and its gradient
        W_KL, b_L = weights(v)
        z_NL = x_NK @ W_KL + b_L
        ce = F.binary_cross_entropy_with_logits(z_NL, y_NL, pos_weight=pos_weight_L, reduction="none").double()
        dz_NL = (torch.sigmoid(z_NL) * (pos_weight_L * y_NL + 1 - y_NL) - pos_weight_L * y_NL) / N
        grad_w = ((xT_KN @ dz_NL + l2 * W_KL)[mask_KL]).double().numpy()
        value = ce.mean(0).sum().item() + l2 / 2 * W_KL.double().pow(2).sum().item() + l1 * v[:-L].sum()
        grad_b = dz_NL.sum(0).double().numpy()
        return value, np.concatenate([grad_w + l1, l1 - grad_w, grad_b] if l1 else [grad_w, grad_b])

    size = (2 * n if l1 else n) + L
    lower = np.r_[np.zeros(2 * n) if l1 else np.full(n, -np.inf), np.full(L, -np.inf)]
    v = minimize(loss, np.zeros(size), jac=True, method="L-BFGS-B", bounds=Bounds(lower, np.inf),
                 options={"maxiter": max_iter}).x
    return weights(v)


def f1_scores(pred_NL, y_NL):
    """F1 of each column's predictions (0 where there is neither a prediction nor a positive)."""
    tp_L = (pred_NL & y_NL).sum(0).float()
    return 2 * tp_L / (pred_NL.sum(0) + y_NL.sum(0)).clamp(min=1)


# --- The words and their activations ---------------------------------------------------------


def collect(model, tokenizer, layer, site, *, seed=0, batch_size=256):
    """The words of the vocabulary, split into train and test words (TEST_FRACTION), their activations at
    (layer, site), and the first-letter probe fitted on the train words: what `measure` takes."""
    ids_N, texts, letter_N = vocabulary_words(tokenizer)
    order = np.random.default_rng(seed).permutation(len(ids_N))
    n_test = int(len(order) * TEST_FRACTION)
    reader = harvest.SiteReader(model, [(layer, site)])
    words = {}
    for split, rows in (("train", order[n_test:]), ("test", order[:n_test])):
        words[f"x_{split}_ND"] = word_activations(reader, tokenizer, ids_N[rows], letter_N[rows], seed, batch_size)
        words[f"letter_{split}_N"] = torch.from_numpy(letter_N[rows])
    words["words_test"] = [texts[i] for i in order[:n_test]]
    return with_probe(words)


def with_probe(words):
    """`words` with the first-letter probe fitted on the train words' activations: probe_DL, probe_bias_L."""
    probe_DL, probe_bias_L = logistic(words["x_train_ND"], F.one_hot(words["letter_train_N"], len(LETTERS)).bool())
    return {**words, "probe_DL": probe_DL, "probe_bias_L": probe_bias_L}


def vocabulary_words(tokenizer):
    """(ids, words, first letters 0-25) of the tokens that are a word start and ASCII letters only: a
    leading-space marker (byte-level BPE's "Ġ", SentencePiece's "▁") and letters."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    found = [(i, " " + t[1:]) for i, t in enumerate(tokens) if t and re.fullmatch("[Ġ▁][A-Za-z]+", t)]
    if len(found) < 10:
        raise ValueError(f"the tokenizer has {len(found)} single-token words (a space and letters); absorption needs "
                         "a model whose vocabulary holds words.")
    ids, words = zip(*found)
    return np.array(ids), list(words), np.array([LETTERS.index(w[1].lower()) for w in words])


@torch.no_grad()
def word_activations(reader, tokenizer, ids_N, letter_N, seed, batch_size):
    """Each word's activation at the reader's site, read at the word itself after a newline and EXAMPLES
    in-context examples "<word> has the first letter: <W>" of other words of the list, drawn anew for each
    batch, whose keys and values are computed once for the batch. Words are single tokens and what
    follows a word cannot change its activation, so the prompt's template after it is left out."""
    from transformers import DynamicCache
    rng = np.random.default_rng(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    newline, template, answers = encode("\n"), encode(TEMPLATE), [encode(" " + c.upper()) for c in LETTERS]
    cache_name = "cache" if "cache" in inspect.signature(reader.model.forward).parameters else "past_key_values"
    device = next(reader.model.parameters()).device
    out = []
    for b0 in tqdm(range(0, len(ids_N), batch_size), desc="absorption: words", unit="batch"):
        batch = range(b0, min(b0 + batch_size, len(ids_N)))
        examples = [i for i in rng.permutation(len(ids_N))[:EXAMPLES + len(batch)] if int(i) not in batch][:EXAMPLES]
        prefix = newline + [t for i in examples for t in [int(ids_N[i])] + template + answers[letter_N[i]] + newline]
        cache = DynamicCache()
        reader(torch.tensor([prefix], device=device), **{cache_name: cache}, use_cache=True)
        cache.batch_repeat_interleave(len(batch))
        ids_B1 = torch.from_numpy(ids_N[b0:batch.stop]).to(device)[:, None]
        out.append(reader(ids_B1, **{cache_name: cache}, use_cache=True)[0][:, -1].float().cpu())
    return torch.cat(out)


# --- What evaluate.py prints and draws -------------------------------------------------------


def table(record):
    """An SAE's figures: its means, then letter by letter."""
    rate = lambda v: "" if v is None else f"{v:.1%}"
    lines = [f"absorption of {record['name']}, mean over the {record['absorption_letters']} letters whose probe has "
             f"F1 > {MIN_PROBE_F1}: absorption fraction {rate(record['absorption_fraction']) or 'n/a'}, full absorption "
             f"{rate(record['full_absorption_rate']) or 'n/a'}",
             "letter  probe F1  true positives  main latents (F1)          absorption fraction  full absorption"]
    for r in record["absorption_by_letter"]:
        main = f"{','.join(map(str, r['main_latents']))} ({r['main_f1']:.2f})"
        kept = r["probe_f1"] > MIN_PROBE_F1 and r["probe_true_positives"]
        lines.append(f"{r['letter']:>6}  {r['probe_f1']:8.2f}  {r['probe_true_positives']:14d}  {main:<25}  "
                     f"{rate(r['absorption_fraction']):>19}  {rate(r['full_absorption_rate']):>15}"
                     + ("" if kept else "  (left out of the mean)"))
    return "\n".join(lines)


def plot(records, folder):
    """Each letter's absorption fraction and full-absorption rate, a bar an SAE; returns the file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    width = 0.8 / len(records)
    for ax, key, label in zip(axes, ("absorption_fraction", "full_absorption_rate"),
                              ("absorption fraction", "full absorption rate")):
        for j, r in enumerate(records):
            values = [v[key] or 0.0 for v in r["absorption_by_letter"]]
            ax.bar(np.arange(len(LETTERS)) + (j - (len(records) - 1) / 2) * width, values, width,
                   label=f"{r['name']} (mean {r[key] or 0.0:.1%})")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_xticks(range(len(LETTERS)), list(LETTERS))
    axes[1].set_xlabel("first letter (probe true positives of the test words)")
    fig.suptitle("feature absorption")
    fig.tight_layout()
    path = Path(folder) / "absorption.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
