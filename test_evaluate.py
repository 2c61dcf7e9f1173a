"""Tests for evaluate.py: metrics with known answers, and the splice into a live (tiny) model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import acts
import evaluate
import export
import harvest
import sae_folder
from jumprelu import JumpReLUSAE

HERE = Path(__file__).parent


def _identity_sae(d):
    """d latents, W_enc = W_dec = I, tiny thresholds: reconstructs any input with positive entries."""
    sae = JumpReLUSAE(d, d, threshold_init=1e-6)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def _mean_sae(x):
    """Every latent dead (huge thresholds): x_hat = b_dec = the mean of x."""
    d = x.shape[1]
    sae = JumpReLUSAE(d, 3, threshold_init=1e6)
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(x.mean(0)))
    return sae


def test_seed_stability_on_a_known_case():
    """Decoder rows of B against A's basis rows q0..q7, shuffled: q0 twice (one-to-one: one match),
    0.8 q1 + 0.6 q8 (cosine 0.8: a match), 0.6 q2 + 0.8 q9 (0.6: none), -q3 (-1: none) and rows
    orthogonal to every q0..q7: 2 of 8 latents match. The encoders are the decoders' transposes,
    scaled (a cosine ignores the scale), except that B's encoder has q2 and q3 themselves: 4 of 8."""
    from baselines import make_sae
    q = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    dec_b = torch.stack([q[0], q[0], 0.8 * q[1] + 0.6 * q[8], 0.6 * q[2] + 0.8 * q[9], -q[3], q[10], q[11], q[12]])
    enc_b = torch.stack([q[0], q[0], q[1], q[2], q[3], q[10], q[11], q[12]])
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    a, b = make_sae("topk", 16, 8, k=2, dtype=torch.float64), make_sae("relu", 16, 8, dtype=torch.float64)
    with torch.no_grad():
        a.W_dec.copy_(q[:8]), a.W_enc.copy_(3 * q[:8].T)
        b.W_dec.copy_(dec_b[order]), b.W_enc.copy_(0.5 * enc_b[order].T)
    assert evaluate.seed_stability(a, b) == {"decoder": 2 / 8, "encoder": 4 / 8}
    assert evaluate.seed_stability(a, a) == {"decoder": 1.0, "encoder": 1.0}
    assert evaluate.seed_stability(a, b, threshold=0.5) == {"decoder": 3 / 8, "encoder": 4 / 8}
    # "cosine > threshold": basis rows match themselves with a cosine of exactly 1, which is not above 1.
    e = make_sae("relu", 4, 4, dtype=torch.float64)
    with torch.no_grad():
        e.W_dec.copy_(torch.eye(4)), e.W_enc.copy_(torch.eye(4))
    assert evaluate.seed_stability(e, e, threshold=1.0) == {"decoder": 0.0, "encoder": 0.0}
    assert evaluate.seed_stability(e, e, threshold=0.999) == {"decoder": 1.0, "encoder": 1.0}


def test_fvu_is_zero_for_a_perfect_reconstruction_and_one_for_the_mean():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, size=(1000, 6)).astype(np.float32)
    shards = [(x[:600], None), (x[600:], None)]
    perfect = evaluate.activation_metrics(_identity_sae(6), shards, batch_size=128)
    assert perfect["fvu"] == pytest.approx(0, abs=1e-10) and perfect["mse"] == pytest.approx(0, abs=1e-10)
    assert perfect["l0"] == 6 and perfect["dead_fraction"] == 0 and perfect["dense_fraction"] == 1
    assert perfect["tokens"] == 1000
    mean = evaluate.activation_metrics(_mean_sae(x), shards, batch_size=128)
    assert mean["fvu"] == pytest.approx(1.0, rel=1e-5) and mean["l0"] == 0 and mean["dead_fraction"] == 1
    assert mean["mse"] == pytest.approx(((x - x.mean(0)) ** 2).sum(1).mean(), rel=1e-5)


def test_fvu_of_rows_all_alike_is_nan_not_a_crash():
    x = np.ones((5, 6), np.float32)                       # no variance: FVU has no meaning
    m = evaluate.activation_metrics(_mean_sae(x + 1), [(x, None)])
    assert np.isnan(m["fvu"]) and m["mse"] == pytest.approx(6.0) and m["tokens"] == 5
    x[0] += np.float32(0.01)                               # a little variance: a real FVU again
    assert np.isfinite(evaluate.activation_metrics(_mean_sae(x + 1), [(x, None)])["fvu"])

def test_firing_frequency_dead_and_dense_by_hand():
    # Latent 0 fires on every row, latent 1 on 5% of rows, latent 2 never.
    x = np.zeros((100, 3), dtype=np.float32)
    x[:, 0] = 1.0
    x[:5, 1] = 1.0
    m = evaluate.activation_metrics(_identity_sae(3), [(x, None)])
    np.testing.assert_allclose(m["firing_frequency"], [1.0, 0.05, 0.0])
    assert m["l0"] == pytest.approx(1.05) and m["dead_fraction"] == pytest.approx(1 / 3)
    assert m["dense_fraction"] == pytest.approx(1 / 3)
    x[:10, 1] = 1.0                                        # latent 1 on exactly 10%: not dense
    assert evaluate.activation_metrics(_identity_sae(3), [(x, None)])["dense_fraction"] == pytest.approx(1 / 3)


def test_splicing_the_activation_itself_leaves_the_loss_unchanged(tiny_model, tiny_acts):
    manifest, shards = acts.open_split(tiny_acts, "heldout")
    model, _ = harvest.load_model(str(tiny_model), "cpu", torch.float32)
    module = harvest.hook_module(model, manifest["layer"], manifest["site"])
    windows = np.concatenate([w for _, w in shards])[:6]

    class Identity(torch.nn.Module):
        def forward(self, h):
            return h

    identity, mean = Identity(), _mean_sae(np.concatenate([a for a, _ in shards]))
    same, worse = evaluate.lm_metrics(model, module, windows, [identity, mean], batch_size=4, progress=False)
    assert same["delta_lm_loss"] == pytest.approx(0, abs=1e-6) and same["kl"] == pytest.approx(0, abs=1e-6)
    assert same["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert worse["delta_lm_loss"] > 0 and worse["kl"] > 0
    # Independently: CE with torch's cross_entropy, the splice by hand (hook), KL with kl_div.
    F = torch.nn.functional
    ids = torch.from_numpy(windows.astype(np.int64))
    with torch.no_grad():
        clean = model(ids).logits[:, 1:-1]
        handle = module.register_forward_hook(lambda m, i, o: torch.cat([o[:, :1], mean(o[:, 1:])], 1))
        spliced = model(ids).logits[:, 1:-1]
        handle.remove()
    ce = lambda logits: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)).item()
    assert same["ce_clean"] == pytest.approx(ce(clean), rel=1e-5)
    assert worse["delta_lm_loss"] == pytest.approx(ce(spliced) - ce(clean), rel=1e-4, abs=1e-6)
    kl = F.kl_div(spliced.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    assert worse["kl"] == pytest.approx(kl.item(), rel=1e-4)
    # The zero ablation: positions 1.. only (zeroing position 0 too gives another loss, which must not pass).
    with torch.no_grad():
        handle = module.register_forward_hook(lambda m, i, o: torch.cat([o[:, :1], torch.zeros_like(o[:, 1:])], 1))
        zero = model(ids).logits[:, 1:-1]
        handle.remove()
        handle = module.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        all_zero = model(ids).logits[:, 1:-1]
        handle.remove()
    assert worse["ce_zero"] == pytest.approx(ce(zero), rel=1e-5) and abs(ce(all_zero) - ce(zero)) > 1e-3
    recovered = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
    assert worse["ce_loss_recovered"] == pytest.approx(recovered, rel=1e-4) and recovered < 0.999


def test_evaluate_end_to_end_and_width_mismatch(tiny_model, tiny_acts, tmp_path, capsys):
    """The LM metrics only when asked for (progress=False: no bar); an SAE of another width, or of
    another layer, is refused by default, in a sentence that names both folders."""
    sae = JumpReLUSAE(32, 64)
    sae_folder.save(sae, tmp_path / "sae")
    records = evaluate.evaluate([tmp_path / "sae"], tiny_acts, lm=True, lm_windows=4, device="cpu", progress=False)
    for key in ("l0", "mse", "fvu", "dead_fraction", "dense_fraction", "delta_lm_loss", "ce_loss_recovered", "kl"):
        assert np.isfinite(records[0][key]), key
    assert "delta_lm_loss" in evaluate.table(records) and "LM splice" not in capsys.readouterr().err
    (plain,) = evaluate.evaluate([tmp_path / "sae"], tiny_acts, device="cpu")
    assert plain["fvu"] == records[0]["fvu"] and not {"ce_clean", "delta_lm_loss", "kl"} & plain.keys()
    sae_folder.save(JumpReLUSAE(16, 64), tmp_path / "narrow")
    with pytest.raises(ValueError) as info:
        evaluate.evaluate([tmp_path / "narrow"], tiny_acts, device="cpu")
    assert str(info.value) == (f"{tmp_path / 'narrow'} takes d_in=16 but {tiny_acts} holds d_in=32 activations; "
                               "pair the SAE with the activations it was trained on.")
    sae.metadata = {**{k: acts.read_manifest(tiny_acts)[k] for k in ("model", "site")}, "layer": 2}
    sae_folder.save(sae, tmp_path / "layer2")
    with pytest.raises(ValueError, match=f"{tmp_path / 'layer2'} was trained on layer 2 but {tiny_acts} holds layer 1"):
        evaluate.evaluate([tmp_path / "layer2"], tiny_acts, device="cpu")
    (mismatched,) = evaluate.evaluate([tmp_path / "layer2"], tiny_acts, device="cpu", allow_mismatch=True)
    assert mismatched["name"] == "layer2" and mismatched["fvu"] == plain["fvu"]


def test_an_sae_of_another_layer_is_refused_unless_on_purpose(tiny_model, corpus, tiny_acts, tmp_path, capsys):
    """An SAE trained on layer 1 must not be evaluated, or spliced in, at layer 2 without a word:
    evaluate.py and export.py refuse it in one sentence unless --allow-mismatch says it is deliberate.
    An SAE that does not say where it comes from (an import) gets a warning."""
    layer2 = harvest.harvest(tmp_path / "layer2", model_name=str(tiny_model), layer=2, tokens=2000, text=[str(corpus)],
                             context=16, batch_size=8, dtype="float32", heldout_every=5, device="cpu")
    capsys.readouterr()                                              # the harvest's own warning of a small held-out split
    sae = JumpReLUSAE(32, 64)
    sae.metadata = {k: acts.read_manifest(tiny_acts)[k] for k in ("model", "layer", "site", "hook")}   # layer 1
    sae_folder.save(sae, tmp_path / "sae")
    for main, extra in ((evaluate.main, []), (export.main, ["--out", str(tmp_path / "sae.onnx")])):
        with pytest.raises(SystemExit) as info:
            main([str(tmp_path / "sae"), "--acts", str(tmp_path / "layer2"), *extra])
        message = str(info.value)
        assert "was trained on layer 1, hook model.layers.1 but" in message and "layer 2, hook model.layers.2" in message
        assert "--allow-mismatch" in message and "\n" not in message and message.count(". ") == 0
        main([str(tmp_path / "sae"), "--acts", str(tmp_path / "layer2"), "--allow-mismatch", *extra])
    assert layer2["layer"] == 2 and not capsys.readouterr().err.count("warning")
    sae_folder.save(JumpReLUSAE(32, 64), tmp_path / "bare")
    evaluate.main([str(tmp_path / "bare"), "--acts", str(tiny_acts)])
    assert "warning: " in capsys.readouterr().err


def test_top_contexts_mark_the_token_where_the_latent_fires_most(tiny_model, tiny_acts):
    manifest, shards = acts.open_split(tiny_acts, "heldout")
    rows, windows = shards[0]
    sae = JumpReLUSAE(32, 4, threshold_init=1e-6)
    row = 37                                   # make latent 2 fire on exactly one held-out row
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 2] = torch.tensor(np.asarray(rows[row], dtype=np.float32))
        sae.b_enc[2] = -(sae.W_enc[:, 2].pow(2).sum() * 0.999)   # pre > 0 only where x == rows[row]
    tokenizer = harvest.load_tokenizer(str(tiny_model))
    text = evaluate.top_contexts(sae, shards, tokenizer, [2, 3], manifest["context"] - 1, k=3)
    a = np.asarray(rows, dtype=np.float64)
    best = int(np.argmax(a @ a[row]))          # the row where latent 2's pre-activation is largest
    window, pos = divmod(best, manifest["context"] - 1)
    token = tokenizer.decode(windows[window][pos + 1:pos + 2])
    lines = text.splitlines()
    assert lines[0] == "latent 2:" and f"[[{token}]]" in lines[1]
    assert "latent 3:" in lines and "(never fires on the held-out tokens)" in text


class _Tokens:
    """A tokenizer whose text is the ids themselves."""
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_top_contexts_read_every_row_of_every_shard_and_the_tokens_before_each():
    """Two float16 shards of 5,000 rows (more than one 4,096-row chunk each), 20 rows a window;
    latent 0 fires most on five rows placed at the chunks' and windows' edges, latent 1 never."""
    context_rows, top = 20, {(0, 4503): 3.0, (0, 4096): 2.5, (1, 4099): 2.0, (1, 0): 1.5, (1, 1): 1.0}
    shards = []
    for s in range(2):
        rows = np.zeros((5000, 2), np.float16)
        rows[:, 0] = 0.5
        for (shard, row), value in top.items():
            rows[row, 0] = value if shard == s else rows[row, 0]
        windows = s * 10**6 + np.arange(250)[:, None] * 100 + np.arange(context_rows + 1)
        shards.append((rows, windows))
    text = evaluate.top_contexts(_identity_sae(2), shards, _Tokens(), [0, 1], context_rows)
    want = ["latent 0:"]
    for (s, row), value in top.items():                 # in order of value; k = 5 and width = 12
        window, pos = divmod(row, context_rows)
        tokens = shards[s][1][window]
        before = _Tokens().decode(tokens[max(0, pos + 1 - 12):pos + 1])
        want.append(f"  {value:8.3f}  {before!r:>60} [[t{tokens[pos + 1]}]]")
    assert text.splitlines() == want + ["latent 1:", "  (never fires on the held-out tokens)"]


def test_activation_metrics_of_float16_rows_are_those_of_the_same_rows_in_float32():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, size=(300, 6)).astype(np.float16)
    half = evaluate.activation_metrics(_identity_sae(6), [(x, None)], batch_size=128)
    full = evaluate.activation_metrics(_identity_sae(6), [(x.astype(np.float32), None)], batch_size=128)
    assert {k: v for k, v in half.items() if k != "firing_frequency"} == \
           {k: v for k, v in full.items() if k != "firing_frequency"}

def test_evaluate_takes_every_architecture_side_by_side(tiny_model, tiny_acts, tmp_path):
    import baselines
    folders = []
    for seed, arch in enumerate(baselines.ARCHITECTURES):
        torch.manual_seed(seed)          # untrained Gated, BatchTopK and ReLU SAEs of one seed coincide
        sae = baselines.make_sae(arch, 32, 64, k=4 if "topk" in arch else None)
        folders.append(sae_folder.save(sae, tmp_path / arch))
    records = evaluate.evaluate(folders, tiny_acts, lm=True, lm_windows=4, device="cpu", progress=False)
    assert [r["architecture"] for r in records] == list(baselines.ARCHITECTURES)
    assert all(np.isfinite(r["delta_lm_loss"]) for r in records)
    topk = records[list(baselines.ARCHITECTURES).index("topk")]
    assert 0 < topk["l0"] <= 4
    assert len({r["ce_spliced"] for r in records}) == len(records)      # each SAE spliced in, not one


def test_frontier_sweeps_then_trains_every_run_once_and_writes_table_json_and_plot(tiny_acts, tmp_path, capsys,
                                                                                    monkeypatch):
    """On the CPU asked for, also where torch sees a GPU (faked: CUDA would fail here), where each SAE
    would compile its loss anew; at two budgets, the sweep and the second seed at the first."""
    import frontier
    from formats import load_sae
    (tmp_path / "res").mkdir()                      # an output file's folder must exist (cli.out_file)
    args = ["--acts", str(tiny_acts), "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res" / "f"),
            "--archs", "jumprelu_tanh", "batchtopk", "batchtopk_matryoshka", "--targets", "4", "8", "--seeds-at", "4", "--d-sae", "64",
            "--steps", "3", "5", "--seeds-steps", "3",
            "--lm-windows", "2", "--lrs", "1e-3", "3e-3", "--sweep-at", "4", "--device", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    frontier.main(args)
    table = (tmp_path / "res" / "f.md").read_text()
    variants = ("jumprelu_tanh", "batchtopk", "batchtopk_matryoshka")
    rows = [line for line in table.splitlines() if line.startswith(tuple(f"| {v} |" for v in variants))]
    assert len(rows) == 2 * 2 + 3 * 5 + 3 * 4      # the sweep (not Matryoshka's): 2 rates; 2 targets x 2 budgets,
                                                    # a second seed at 4 and 3 steps; the means
    results = json.loads((tmp_path / "res" / "f.json").read_text())
    records, lr = results["records"], results["settings"]["lr"]
    assert sorted((r["variant"], r["target"], r["steps"], r["seed"]) for r in records) == sorted(
        [(a, t, n, 0) for a in variants for t in (4, 8) for n in (3, 5)] + [(a, 4, 3, 1) for a in variants])
    assert all(load_sae(r["path"]).metadata["steps"] == r["steps"] for r in records)
    assert {str(load_sae(r["path"]).metadata.get("matryoshka")) for r in records if r["variant"] == variants[2]} == {"[4, 16, 64]"}
    assert not any("matryoshka" in load_sae(r["path"]).metadata for r in records if r["variant"] != variants[2])
    assert all(r["lr"] == lr[r["variant"]] for r in records) and set(lr.values()) <= {1e-3, 3e-3}
    for variant in variants[:2]:                    # the chosen rate has the lowest FVU of the sweep (all near 4 or none)
        sweep = [r for r in results["sweep"] if r["variant"] == variant]
        assert len(sweep) == 2 and lr[variant] in [r["lr"] for r in sweep] and {r["steps"] for r in sweep} == {3}
        assert lr[variant] == min(sweep, key=lambda r: (abs(r["l0"] - 4) > 0.4, r["fvu"]))["lr"]
    assert lr["batchtopk_matryoshka"] == lr["batchtopk"] and not any(r["variant"] == variants[2] for r in results["sweep"])
    assert all(0 <= r["decoder_match"] <= 1 and 0 <= r["encoder_match"] <= 1 for r in records if (r["target"], r["steps"]) == (4, 3))
    assert not any("decoder_match" in r for r in records if (r["target"], r["steps"]) != (4, 3))
    seeds = [r for r in records if (r["variant"], r["target"], r["steps"]) == ("batchtopk", 4, 3)]
    fvu = [r["fvu"] for r in seeds]                 # the means table: the mean of the two seeds and their range
    assert f"| batchtopk | 4 | 6k | 2 | {sum(r['l0'] for r in seeds) / 2:.1f} " in table
    assert f"{sum(fvu) / 2:.4f} ({max(fvu) - min(fvu):.4f})" in table
    assert formats_sparsity(records, "jumprelu_tanh") == "tanh"
    assert (tmp_path / "res" / "f.png").stat().st_size > 10_000 and results["settings"]["machine"].endswith("threads")
    capsys.readouterr()
    frontier.main(args)                             # run again: every SAE is there already
    assert capsys.readouterr().out.count("done already") == 2 * 2 + 3 * 5


def formats_sparsity(records, variant):
    """The sparsity term a variant's SAE was trained with, from its config.json."""
    from formats import load_sae
    return load_sae(next(r["path"] for r in records if r["variant"] == variant)).metadata["sparsity"]


def test_evaluate_main_prints_and_writes_the_metrics_of_the_held_out_rows(tiny_acts, tmp_path, capsys, monkeypatch):
    """evaluate.main, in-process, on an SAE whose thresholds let some latents fire and keep others
    silent: the table and the --json record hold L0, MSE, FVU, the dead and dense fractions and each
    latent's firing frequency over every held-out row, as NumPy computes them from the saved files
    (FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2, docs/maths.md section 5); --latents prints each latent's
    top contexts (the busiest latent's five, the largest first), the silent one's as never firing."""
    from safetensors.numpy import load_file
    manifest = acts.read_manifest(tiny_acts)
    g = torch.Generator().manual_seed(0)
    sae = JumpReLUSAE(32, 48)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 48, generator=g))
        sae.W_dec.copy_(torch.randn(48, 32, generator=g) / 8)
        sae.b_dec.copy_(torch.randn(32, generator=g))
        sae.log_threshold.copy_(torch.linspace(-3, 3, 48).exp().log() + 1)   # theta from e^-2 to e^4
        sae.log_threshold[0] = 10.0                                             # latent 0 never fires
    sae.metadata = {k: manifest[k] for k in ("model", "layer", "site", "hook")}
    sae_folder.save(sae, tmp_path / "sae")
    w = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    _, shards = acts.open_split(tiny_acts, "heldout")
    x = np.concatenate([np.asarray(a, dtype=np.float64) for a, _ in shards])
    pre = x @ w["W_enc"].astype(np.float64) + w["b_enc"]
    f = np.where(pre > w["threshold"], pre, 0.0)
    x_hat = f @ w["W_dec"].astype(np.float64) + w["b_dec"]
    freq = (f != 0).mean(0)
    busiest = int(freq.argmax())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # a GPU machine (faked): the CPU asked for
    evaluate.main([str(tmp_path / "sae"), "--acts", str(tiny_acts), "--json", str(tmp_path / "e.json"),
                   "--latents", f"0,{busiest}", "--device", "cpu"])
    printed = capsys.readouterr().out
    (record,) = json.loads((tmp_path / "e.json").read_text())
    want = {"tokens": len(x), "l0": (f != 0).sum(1).mean(), "mse": ((x - x_hat) ** 2).sum(1).mean(),
            "fvu": ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), "dead_fraction": (freq == 0).mean(),
            "dense_fraction": (freq > evaluate.DENSE).mean()}
    assert 0 < want["dead_fraction"] < 1 and 0 < want["l0"] < 48
    for key, value in want.items():
        assert record[key] == pytest.approx(value, rel=1e-5), key
    np.testing.assert_allclose(record["firing_frequency"], freq, rtol=1e-6)
    assert record["name"] == "sae" and record["path"] == str(tmp_path / "sae") and record["d_sae"] == 48
    header, row = printed.splitlines()[:2]
    assert header.split() == ["name", "width", "tokens", "l0", "mse", "fvu", "dead_fraction", "dense_fraction"]
    assert row.split() == ["sae", "48", f"{want['l0']:.1f}", f"{want['mse']:.4g}", f"{want['fvu']:.4f}",
                           f"{want['dead_fraction']:.1%}", f"{want['dense_fraction']:.1%}"]
    assert f"wrote {tmp_path / 'e.json'}" in printed and f"== {tmp_path / 'sae'}" in printed
    assert f"latent 0:\n  (never fires on the held-out tokens)\nlatent {busiest}:\n" in printed
    top = printed.split(f"latent {busiest}:\n")[1].splitlines()[:5]
    assert len(top) == 5 and float(top[0].split()[0]) == pytest.approx(f[:, busiest].max(), abs=1e-3)


def test_check_pairing_names_the_model_by_its_hub_id_and_refuses_a_mismatch_by_default():
    """"smollm2" (harvest.py's name of the packaged GGUF) and its hub id are the same model; another
    model, or the same model at another layer, is refused unless allow_mismatch."""
    sae = JumpReLUSAE(4, 8)
    manifest = {"d_in": 4, "model": "smollm2", "layer": 3, "site": "resid"}
    for model in ("smollm2", harvest.hub_id("smollm2")):
        sae.metadata = {"model": model, "layer": 3, "site": "resid"}
        evaluate.check_pairing(sae, manifest, "sae", "acts")
    assert harvest.hub_id("smollm2") != "smollm2"
    for wrong in ({"model": "gpt2"}, {"layer": 4}, {"site": "mlp"}):
        sae.metadata = {"model": "smollm2", "layer": 3, "site": "resid", **wrong}
        with pytest.raises(ValueError, match=f"was trained on {next(iter(wrong))} "):
            evaluate.check_pairing(sae, manifest, "sae", "acts")
        evaluate.check_pairing(sae, manifest, "sae", "acts", allow_mismatch=True)


def test_table_lines_up_every_column_and_leaves_a_missing_one_blank():
    """The printed table: a header of the columns any record has, each cell in its format (L0 to one
    decimal, MSE to 4 significant digits, fractions in percent, the LM metrics to 4 decimals), right-
    aligned under its header; a record without the LM metrics leaves those cells blank."""
    records = [{"name": "a", "d_sae": 4608, "trained_tokens": 1_228_800, "l0": 25.04, "mse": 1.5e-5, "fvu": 0.08312,
                "dead_fraction": 0.001, "dense_fraction": 0.0, "delta_lm_loss": 0.03371, "ce_loss_recovered": 0.9912,
                "kl": 0.17049},
               {"name": "bb", "d_sae": 64, "trained_tokens": None, "l0": 7.0, "mse": 12.5, "fvu": 0.5,
                "dead_fraction": 0.25, "dense_fraction": 0.125}]
    assert evaluate.table(records).splitlines() == [
        "name  width     tokens    l0      mse     fvu  dead_fraction  dense_fraction  delta_lm_loss  ce_loss_recovered      kl",
        "   a  4,608  1,228,800  25.0  1.5e-05  0.0831           0.1%            0.0%         0.0337              99.1%  0.1705",
        "  bb     64              7.0     12.5  0.5000          25.0%           12.5%                                          "]


class _TupleBlock(torch.nn.Module):
    """A decoder layer that returns (hidden states, something else), as some transformers versions do."""

    def forward(self, h):
        return h * 2, "cache"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_splice_replaces_positions_after_the_first_and_keeps_the_rest_of_a_tuple(dtype):
    """Splice swaps the site's output at positions 1.. for fn(output), in the output's dtype, leaves
    position 0 (BOS) as it was, and passes the other entries of a tuple output through."""
    block = _TupleBlock()
    h = torch.arange(12, dtype=dtype).view(1, 3, 4)
    with evaluate.Splice(block, lambda t: t.float() + 0.5):
        out, extra = block(h)
    assert extra == "cache" and out.dtype == dtype
    assert torch.equal(out[:, 0], h[:, 0] * 2) and torch.equal(out[:, 1:], (h[:, 1:] * 2).float().add(0.5).to(dtype))
    assert torch.equal(block(h)[0], h * 2)                   # the hook is gone on exit


def test_evaluate_main_refuses_a_latent_the_sae_does_not_have(tiny_acts, tmp_path):
    """--latents beyond the SAE's width ends in one line that names the latent and the range."""
    sae_folder.save(JumpReLUSAE(32, 48), tmp_path / "sae")
    with pytest.raises(SystemExit) as info:
        evaluate.main([str(tmp_path / "sae"), "--acts", str(tiny_acts), "--latents", "3,48"])
    assert str(info.value) == f"error: --latents [48] out of range: {tmp_path / 'sae'} has latents 0 to 47."


def _acts_copy(tiny_acts, folder, **changes):
    """A copy of the harvested folder whose manifest says `changes` (signed again, as harvest.py signs it)."""
    import shutil
    shutil.copytree(tiny_acts, folder)
    acts.write_manifest(folder, {**acts.read_manifest(folder), **changes})
    return folder


def test_evaluate_picks_the_gpu_by_default_and_keeps_the_device_asked_for(tiny_acts, tmp_path, monkeypatch):
    """With no device, evaluate runs on cuda where torch sees a GPU and on the CPU otherwise; --device
    cpu is kept even where there is a GPU. (No GPU here: torch is told it has one, and load_sae notes
    the device it is asked for, then stops the run.)"""
    sae_folder.save(JumpReLUSAE(32, 8), tmp_path / "sae")
    asked = []

    def load_sae(folder, device=None):
        asked.append(device)
        raise ValueError("stopped")

    monkeypatch.setattr(evaluate, "load_sae", load_sae)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        with pytest.raises(ValueError, match="stopped"):
            evaluate.evaluate([tmp_path / "sae"], tiny_acts)
        with pytest.raises(SystemExit, match="stopped"):
            evaluate.main([str(tmp_path / "sae"), "--acts", str(tiny_acts), "--device", "cpu"])
    assert asked == ["cpu", "cpu", "cuda", "cpu"]


def test_evaluate_main_with_lm_splices_the_windows_asked_for(tiny_acts, tmp_path, capsys, monkeypatch):
    """--lm --lm-windows 3: the record and the table hold the LM metrics over 3 windows' predictions
    (positions 1 to context-2), the numbers evaluate() gives on the CPU (with --device cpu, also where
    torch sees a GPU, faked here); the splice shows its progress."""
    sae_folder.save(JumpReLUSAE(32, 64), tmp_path / "sae")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    evaluate.main([str(tmp_path / "sae"), "--acts", str(tiny_acts), "--lm", "--lm-windows", "3",
                   "--json", str(tmp_path / "e.json"), "--device", "cpu"])
    printed = capsys.readouterr()
    (record,) = json.loads((tmp_path / "e.json").read_text())
    assert record["lm_tokens"] == 3 * (acts.read_manifest(tiny_acts)["context"] - 2)
    (want,) = evaluate.evaluate([tmp_path / "sae"], tiny_acts, lm=True, lm_windows=3, device="cpu", progress=False)
    for key in ("ce_clean", "ce_zero", "ce_spliced", "delta_lm_loss", "ce_loss_recovered", "kl"):
        assert record[key] == pytest.approx(want[key], rel=1e-6), key
    assert printed.out.splitlines()[0].split()[-3:] == ["delta_lm_loss", "ce_loss_recovered", "kl"]
    assert "LM splice" in printed.err


def test_lm_windows_beyond_the_held_out_split_are_said_and_the_split_is_used(tiny_acts, tmp_path, capsys):
    sae_folder.save(JumpReLUSAE(32, 64), tmp_path / "sae")
    held = sum(len(w) for _, w in acts.open_split(tiny_acts, "heldout")[1])
    (record,) = evaluate.evaluate([tmp_path / "sae"], tiny_acts, lm=True, lm_windows=held + 1, device="cpu", progress=False)
    assert record["lm_tokens"] == held * (acts.read_manifest(tiny_acts)["context"] - 2)
    lm_warnings = lambda: [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --lm")]
    assert lm_warnings() == [f"warning: --lm-windows {held + 1} asked for more windows than {tiny_acts}'s held-out split "
                             f"holds; the LM metrics use its {held}."]
    evaluate.evaluate([tmp_path / "sae"], tiny_acts, lm=True, lm_windows=held, device="cpu", progress=False)
    assert lm_warnings() == []


def test_evaluate_runs_a_bfloat16_checkpoint_in_float32_on_a_cpu(tiny_model, tiny_acts, tmp_path):
    """Most checkpoints on the hub are bfloat16; on a CPU evaluate runs the model in float32 (bfloat16
    is for a GPU), so its LM metrics are lm_metrics' on the float32 model, to the last digits."""
    import shutil
    from transformers import AutoModelForCausalLM
    shutil.copytree(tiny_model, tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    folder = _acts_copy(tiny_acts, tmp_path / "acts", model=str(tmp_path / "bf16"))
    sae = JumpReLUSAE(32, 64)
    sae_folder.save(sae, tmp_path / "sae")
    (record,) = evaluate.evaluate([tmp_path / "sae"], folder, lm=True, lm_windows=4, device="cpu", progress=False)
    manifest, shards = acts.open_split(folder, "heldout")
    model, _ = harvest.load_model(str(tmp_path / "bf16"), "cpu", torch.float32)
    module = harvest.hook_module(model, manifest["layer"], manifest["site"])
    (want,) = evaluate.lm_metrics(model, module, shards[0][1][:4], [sae], progress=False)
    for key in ("ce_clean", "ce_zero", "ce_spliced", "kl"):
        assert record[key] == pytest.approx(want[key], rel=1e-6), key


def test_evaluate_loads_the_gguf_file_its_manifest_names(tiny_acts, tmp_path):
    """A folder harvested from one GGUF file of a model folder (--gguf-file) is evaluated with that
    file, for the LM metrics and for --latents' tokenizer: one the folder lacks is reported, not
    replaced by the folder's other weights."""
    folder = _acts_copy(tiny_acts, tmp_path / "acts", gguf_file="absent.gguf")
    sae_folder.save(JumpReLUSAE(32, 8), tmp_path / "sae")
    with pytest.raises(ValueError, match="could not load .*absent.gguf"):
        evaluate.evaluate([tmp_path / "sae"], folder, lm=True, lm_windows=1, device="cpu", progress=False)
    with pytest.raises(SystemExit, match="could not load .*absent.gguf"):
        evaluate.main([str(tmp_path / "sae"), "--acts", str(folder), "--latents", "0"])


def _png_size(path):
    """(width, height) in pixels, from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_draws_each_architecture_against_l0_and_each_histogram_of_firing_frequencies(tmp_path, monkeypatch):
    """What the two PNGs show, read from the figures as they are saved: one panel per metric (FVU,
    delta LM loss), each with one line per architecture through its SAEs in order of L0, dots on the
    points, named in the legend; one step histogram of log10 firing frequency per SAE, in 50 bins
    over the latents that fire, named with its dead fraction. 5 x 4 inches a panel, 6 x 4 for the
    histograms, at 120 dpi; the folder is made with its parents; no figure is left open."""
    import matplotlib
    import matplotlib.pyplot as plt
    saved, savefig = [], matplotlib.figure.Figure.savefig      # each figure, as plot saves it
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k)))
    rng = np.random.default_rng(0)
    freq = [np.concatenate([[0.0, 0.0, 1.0], 10 ** rng.uniform(-5, 0, 200)]), np.r_[0.0, 10 ** rng.uniform(-3, -1, 50)]]
    rows = [("j40", "jumprelu", 40, 0.10, 0.05, 4608), ("t8", "topk", 8, 0.30, 0.20, 2304),
            ("j10", "jumprelu", 10, 0.25, 0.15, 4608), ("t32", "topk", 32, 0.12, 0.08, 2304),
            ("w16", "topk", 16, 0.11, 0.07, 4608)]                   # wider: a line of its own
    records = [{"name": n, "architecture": a, "d_sae": w, "trained_tokens": 1_228_800 if a == "jumprelu" else None,
                "l0": l0, "fvu": fvu, "delta_lm_loss": d, "dead_fraction": i / 8, "firing_frequency": freq[i % 2]}
               for i, (n, a, l0, fvu, d, w) in enumerate(rows)]
    kinds = {"jumprelu, 4,608 latents, 1,228,800 tokens": ("j10", "j40"), "topk, 2,304 latents": ("t8", "t32"),
             "topk, 4,608 latents": ("w16",)}
    folder = tmp_path / "new" / "plots"
    paths = evaluate.plot(records, folder)
    assert paths == [folder / "sparsity_fidelity.png", folder / "firing_frequency.png"] and plt.get_fignums() == []
    assert [_png_size(p) for p in paths] == [(1200, 480), (720, 480)]
    frontier, hist = saved
    assert frontier._suptitle.get_text() == "sparsity-fidelity (held-out tokens)"
    assert [ax.get_ylabel() for ax in frontier.axes] == ["FVU", "delta LM loss (nats)"]
    for ax, metric in zip(frontier.axes, ("fvu", "delta_lm_loss")):
        assert ax.get_xlabel() == "L0 (active latents per token)"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(kinds)
        for line, (kind, names) in zip(ax.get_lines(), kinds.items(), strict=True):
            rs = [next(r for r in records if r["name"] == n) for n in names]
            assert line.get_label() == kind and (line.get_marker(), line.get_linestyle()) == ("o", "-")
            assert list(line.get_xdata()) == [r["l0"] for r in rs] and list(line.get_ydata()) == [r[metric] for r in rs]
    (ax,) = hist.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("log10 firing frequency", "latents")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "j40 (jumprelu, 4,608 latents, 1,228,800 tokens; dead 0.0%)", "t8 (topk, 2,304 latents; dead 12.5%)",
        "j10 (jumprelu, 4,608 latents, 1,228,800 tokens; dead 25.0%)", "t32 (topk, 2,304 latents; dead 37.5%)",
        "w16 (topk, 4,608 latents; dead 50.0%)"]
    assert len(ax.patches) == len(records)
    for step, r in zip(ax.patches, records):        # a step outline: (left edge, count) at every other vertex
        assert isinstance(step, matplotlib.patches.Polygon)
        counts, edges = np.histogram(np.log10(r["firing_frequency"][r["firing_frequency"] > 0]), bins=50)
        np.testing.assert_allclose(step.get_xy()[1:-1:2], np.c_[edges[:-1], counts])
    evaluate.plot([{k: v for k, v in r.items() if k != "delta_lm_loss"} for r in records], folder)
    assert [ax.get_ylabel() for ax in saved[2].axes] == ["FVU"] and _png_size(paths[0]) == (600, 480)


def test_the_readmes_python_snippet_runs_as_written(tiny_acts, tiny_model, tmp_path):
    """README's "From Python" block, run as it is in a folder with runs/acts and runs/sae_l0_32: the
    first token's top latents and the rows' L0 and FVU, as evaluate.py measures them."""
    import train
    snippet = re.search(r"## From Python.*?```python\n(.*?)```", (HERE / "README.md").read_text(), re.S).group(1)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "acts").symlink_to(tiny_acts)
    train.train(tiny_acts, tmp_path / "runs" / "sae_l0_32", d_sae=64, steps=6, target_l0=4, batch_size=128, quiet=True,
                device="cpu")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(HERE)})
    assert run.returncode == 0, run.stderr
    sae = sae_folder.load(tmp_path / "runs" / "sae_l0_32")
    manifest, shards = acts.open_split(tiny_acts, "heldout")
    assert len(shards) == 1 and len(shards[0][0]) < 1024                 # the snippet's rows are the whole split
    m = evaluate.activation_metrics(sae, shards)
    top, summary = run.stdout.splitlines()
    assert summary == f"{m['tokens']} rows: L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}"
    token = harvest.load_tokenizer(str(tiny_model)).decode(int(shards[0][1][0, 1]))
    f0 = sae.encode(torch.from_numpy(np.array(shards[0][0][:1], dtype=np.float32)))[0].detach()
    assert top.startswith(f"{token!r}: ") and [int(p.split(":")[0]) for p in top.split(": ", 1)[1].split(", ")] == \
        f0.topk(5).indices.tolist()
