"""Tests for export.py and infer_onnx.py: parity with PyTorch, the threshold edge, no-torch inference."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
import sae_folder
from jumprelu import JumpReLUSAE
from sae_folder import exact_log

HERE = Path(__file__).parent
NODE_EXAMPLE = HERE / "examples" / "node"
NO_NODE = ("node is not installed" if shutil.which("node") is None else
           "onnxruntime-node is not installed (npm install --ignore-scripts --prefix examples/node)"
           if not (NODE_EXAMPLE / "node_modules" / "onnxruntime-node").is_dir() else None)


def _sae(d_in=24, d_sae=96, seed=0, pre_bias=False):
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, pre_encoder_bias=pre_bias)
    with torch.no_grad():
        W_dec = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))    # unit rows, as every trained SAE
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        sae.log_threshold.copy_(torch.rand(d_sae, generator=g).log() - 1)
    sae.metadata.update(model="tiny", layer=1, site="resid", input_scale=0.5)
    return sae


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _at_threshold_latents(sae):
    """Latent 0's pre-activation is its threshold exactly, latent 1's one float above, latent 2's one below."""
    with torch.no_grad():
        sae.W_enc[:, :3] = 0
        theta = sae.threshold[:3]
        sae.b_enc[0] = theta[0]
        sae.b_enc[1] = torch.nextafter(theta[1], torch.tensor(10.0))
        sae.b_enc[2] = torch.nextafter(theta[2], torch.tensor(0.0))
    return sae


@pytest.mark.parametrize("what", ["encoder", "sae"])
@pytest.mark.parametrize("pre_bias", [False, True])
def test_float32_parity_within_1e_5_relative(tmp_path, what, pre_bias):
    sae = _sae(pre_bias=pre_bias)
    module = export.export(sae, tmp_path / "m.onnx", what=what)
    ok, reports, provider, tol = export.verify(tmp_path / "m.onnx", module, sae, rows=300)
    assert ok and tol == 1e-5 and reports["random"]["max_rel"] < 1e-5
    x = np.random.default_rng(1).standard_normal((50, 24)).astype(np.float32) * 2
    out = _run(tmp_path / "m.onnx", x)
    with torch.no_grad():
        np.testing.assert_allclose(out[0], sae.encode(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
        if what == "sae":
            np.testing.assert_allclose(out[1], sae(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_dynamic_batch_and_metadata(tmp_path):
    sae = _sae()
    export.export(sae, tmp_path / "m.onnx")
    for rows in (1, 7, 300):
        assert _run(tmp_path / "m.onnx", np.zeros((rows, 24), np.float32))[0].shape == (rows, 96)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert (meta["d_in"], meta["d_sae"], meta["model"], meta["layer"], meta["site"], meta["input_scale"]) == (24, 96, "tiny", 1, "resid", 0.5)


@pytest.mark.parametrize("fp16", [False, True])
def test_pre_activation_equal_to_threshold_is_inactive_after_export(tmp_path, fp16):
    """Latent 0's pre-activation is its threshold exactly, latent 1's one step above, latent 2's one
    below: float32 steps, or for fp16 float16 steps around theta = 0.5 (exact in both), since the
    float16 graph rounds b_enc and compares in float32 against the float32 thresholds."""
    sae = _at_threshold_latents(_sae())
    if fp16:    # and latent 3: theta a quarter float16 step below 0.5, which float16 would round up to 0.5
        with torch.no_grad():
            sae.W_enc[:, 3] = 0
            sae.log_threshold[:4] = exact_log(torch.tensor([0.5, 0.5, 0.5, 0.5 - 2.0**-13]))
            sae.b_enc[:4] = torch.tensor([0.5, 0.5 + 2.0**-11, 0.5 - 2.0**-12, 0.5])    # float16 neighbours of 0.5
    export.export(sae, tmp_path / "m.onnx", fp16=fp16)
    f = _run(tmp_path / "m.onnx", np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32))[0]
    assert (f[:, 0] == 0).all() and (f[:, 1] != 0).all() and (f[:, 2] == 0).all()
    assert not fp16 or (f[:, 3] == 0.5).all()                      # compared in float32: 0.5 > theta
    assert f.dtype == np.float32


@pytest.mark.parametrize("fp16", [False, True])
def test_a_threshold_of_zero_exports_as_pre_greater_than_zero(tmp_path, fp16):
    """Latents whose threshold is exactly 0 (imported from SAELens) fire where pre > 0, in ONNX as in
    PyTorch, and the parity check passes with them."""
    sae = _sae()
    with torch.no_grad():
        sae.log_threshold[:40] = -math.inf                       # theta = 0
        sae.W_enc[:, :2] = 0
        sae.b_enc[:2] = torch.tensor([0.0, 1e-3])                 # pre = 0 exactly, and just above
    module = export.export(sae, tmp_path / "m.onnx", fp16=fp16)
    x = np.random.default_rng(3).standard_normal((64, 24)).astype(np.float32)
    f = _run(tmp_path / "m.onnx", x)[0]
    assert (f[:, 0] == 0).all() and (f[:, 1] > 0).all()
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(f[:, 2:40] > 0, want[:, 2:40] > 0)    # exactly where pre > 0
    ok, reports, _, _ = export.verify(tmp_path / "m.onnx", module, sae)
    assert ok, reports


def test_fp16_and_topk_exports_verify(tmp_path):
    sae = _sae(d_sae=200)
    for kw in ({"fp16": True}, {"topk": 8}, {"topk": 8, "fp16": True, "what": "sae"}):
        module = export.export(sae, tmp_path / "m.onnx", **kw)
        ok, reports, _, tol = export.verify(tmp_path / "m.onnx", module, sae, rows=200)
        assert ok, (kw, reports)
    names = [o.name for o in ort.InferenceSession(str(tmp_path / "m.onnx")).get_outputs()]
    assert names == ["indices", "values", "x_hat"]


def test_verify_catches_a_wrong_export(tmp_path):
    sae = _sae()
    module = export.export(sae, tmp_path / "m.onnx")
    with torch.no_grad():
        sae.log_threshold += 0.5            # the file no longer matches the SAE it is checked against
    ok, reports, _, _ = export.verify(tmp_path / "m.onnx", module, sae, rows=200)
    assert not ok and reports["random"]["max_rel"] == float("inf")


def test_inference_example_runs_where_torch_cannot_be_imported(tmp_path):
    sae = _sae()
    export.export(sae, tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((10, 24)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not available in this pipeline')\n")
    env = {"PYTHONPATH": str(tmp_path / "no_torch"), "PATH": "/usr/bin:/bin"}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "not available" in check.stderr
    run = subprocess.run([sys.executable, str(HERE / "infer_onnx.py"), str(tmp_path / "m.onnx"), str(tmp_path / "acts.npy"),
                          "--rows", "10"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        l0 = (sae.encode(torch.from_numpy(x)) != 0).sum(1).float().mean().item()
    assert f"mean L0 over 10 rows: {l0:.1f}" in run.stdout
    np.save(tmp_path / "wide.npy", np.zeros((3, 25), np.float32))
    bad = subprocess.run([sys.executable, str(HERE / "infer_onnx.py"), str(tmp_path / "m.onnx"), str(tmp_path / "wide.npy")],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "shape [rows, 24]" in bad.stderr


def test_export_cli_reports_errors_and_exits_nonzero(tmp_path):
    sae = _sae()
    sae_folder.save(sae, tmp_path / "sae")
    ok = subprocess.run([sys.executable, str(HERE / "export.py"), str(tmp_path / "sae"), "--out", str(tmp_path / "m.onnx")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "max rel error" in ok.stdout and "matches PyTorch" in ok.stdout
    bad = subprocess.run([sys.executable, str(HERE / "export.py"), str(tmp_path / "sae"), "--out", str(tmp_path / "t.onnx"),
                          "--topk", "1000"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--topk must be between 1 and d_sae=96" in bad.stderr


def test_onnx_benchmark_quick_mode_runs_and_the_runtimes_agree(tmp_path, capsys):
    import bench
    bench.main(["onnx", "--quick", "--json", str(tmp_path / "b.json")])
    rows = json.loads((tmp_path / "b.json").read_text())["onnx"]
    assert {r["graph"] for r in rows} == {"float32", "fp16", "top-k"} and all(r["onnxruntime_tokens_per_s"] > 0 for r in rows)
    assert all(r["max_rel_diff"] <= (2e-2 if r["graph"] == "fp16" else 1e-5) for r in rows)
    assert "ORT / PyTorch" in capsys.readouterr().out


def _baseline(arch, d_in=24, d_sae=96, seed=0):
    """A baseline SAE with random weights; BatchTopK with a positive inference threshold."""
    import baselines
    torch.manual_seed(seed)
    sae = baselines.make_sae(arch, d_in, d_sae, k=8 if "topk" in arch else None)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
    return sae


@pytest.mark.parametrize("arch", ["relu", "gated", "topk", "batchtopk"])
@pytest.mark.parametrize("what", ["encoder", "sae"])
def test_every_architecture_exports_and_matches_its_own_forward(tmp_path, arch, what):
    sae = _baseline(arch)
    module = export.export(sae, tmp_path / "m.onnx", what=what)
    ok, reports, _, _ = export.verify(tmp_path / "m.onnx", module, sae, rows=300)
    assert ok and reports["random"]["max_rel"] < 1e-5, reports
    x = np.random.default_rng(1).standard_normal((50, 24)).astype(np.float32)
    out = _run(tmp_path / "m.onnx", x)
    with torch.no_grad():     # against the SAE's own encode (docs/maths.md section 4), not the export's graph
        f = sae.encode(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out[0], f, rtol=1e-5, atol=1e-6)
        assert (out[0] != 0).sum() > 0 and (out[0] == 0).sum() > 0
        if what == "sae":
            np.testing.assert_allclose(out[1], sae(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["architecture"] == arch and meta["active"] == export.ACTIVE[arch]


def test_a_wrong_baseline_export_is_caught(tmp_path):
    sae = _baseline("gated")
    module = export.export(sae, tmp_path / "m.onnx")
    with torch.no_grad():
        sae.r_mag.add_(0.01)          # the file no longer matches the SAE
    ok, reports, _, _ = export.verify(tmp_path / "m.onnx", module, sae, rows=100)
    assert not ok and reports["random"]["max_rel"] > 1e-3


@pytest.mark.skipif(NO_NODE is not None, reason=str(NO_NODE))
def test_node_example_prints_the_latents_of_a_float64_numpy_reference(tmp_path):
    """examples/node/encode.js (onnxruntime-node) prints the active latents that a float64 NumPy
    encoder, computed from the saved SAE's weights, finds, with their values to float32 rounding;
    a pre-activation exactly at its threshold is inactive. Flips are allowed only in the tie zone."""
    sae = _at_threshold_latents(_sae())
    sae_folder.save(sae, tmp_path / "sae")
    export.export(sae, tmp_path / "encoder.onnx")
    x = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(["node", str(NODE_EXAMPLE / "encode.js"), str(tmp_path / "encoder.onnx"), str(tmp_path / "x.npy"),
                          "40"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "40 rows, d_in 24, d_sae 96, provider " in run.stdout          # cpu, or cuda with the GPU binaries
    got = np.zeros((40, 96))
    for line in run.stdout.splitlines()[1:]:
        row, pairs = int(line.split(":")[0].removeprefix("row ")), line.split(": ", 2)[2].split()
        for i, v in (pair.split(":") for pair in pairs):
            got[row, int(i)] = float(v)
    from safetensors.numpy import load_file
    w = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "sae" / "sae.safetensors")).items()}
    pre = x.astype(np.float64) @ w["W_enc"] + w["b_enc"]             # docs/maths.md section 1, in float64
    want = np.where(pre > w["threshold"], pre, 0.0)
    assert (want[:, [0, 2]] == 0).all() and (want[:, 1] != 0).all()
    assert (got[:, [0, 2]] == 0).all() and (got[:, 1] != 0).all()
    tie = np.abs(pre - w["threshold"]) <= 8 * 2.0**-24 * (np.abs(x) @ np.abs(w["W_enc"]) + np.abs(w["b_enc"]))
    flipped = (got != 0) != (want != 0)
    assert not (flipped & ~tie).any()
    both = (got != 0) & (want != 0)
    assert np.abs(got - want)[both].max() <= 1e-6 * np.abs(want).max()


@pytest.mark.skipif(NO_NODE is not None, reason=str(NO_NODE))
def test_node_example_reads_a_top_k_export(tmp_path):
    """On a --topk 5 export, examples/node/encode.js prints each row's active latents among the top 5,
    as a float64 NumPy encoder finds them, and an L0 of ">=5" where all five are active."""
    sae = _random_sae("jumprelu")
    sae_folder.save(sae, tmp_path / "sae")
    export.export(sae, tmp_path / "top.onnx", topk=5)
    x = (np.random.default_rng(1).normal(size=(64, 24)) * 0.3).astype(np.float32)   # 0 to 5 or more latents fire
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(["node", str(NODE_EXAMPLE / "encode.js"), str(tmp_path / "top.onnx"), str(tmp_path / "x.npy"),
                          "64"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "64 rows, d_in 24, the top 5 latents, provider " in run.stdout
    f_ref, _, margin = numpy_sae(tmp_path / "sae", x.astype(np.float64))
    want, clear = _top(f_ref, 5), (margin > 1e-4).all(1)
    assert clear.mean() > 0.5 and {len(w) for w, c in zip(want, clear) if c} == {0, 1, 2, 3, 4, 5}
    for line in run.stdout.splitlines()[1:]:
        row, l0, pairs = line.split(": ", 2)
        r, got = int(row.removeprefix("row ")), {int(i): float(v) for i, v in (p.split(":") for p in pairs.split())}
        if clear[r]:
            assert l0 == ("L0 >=5" if len(want[r]) == 5 else f"L0 {len(want[r])}") and got.keys() == want[r].keys()
            np.testing.assert_allclose([got[i] for i in want[r]], list(want[r].values()), rtol=1e-5, atol=1e-6)


# --- Every graph against NumPy computed from the saved files alone ------------------------------

ARCHS = ["jumprelu", "relu", "gated", "topk", "batchtopk"]


def _random_sae(arch, d_in=24, d_sae=96, seed=0):
    """A random SAE of `arch` with spread thresholds: some latents with large pre-activations stay
    below theirs, so the top k of the features is not the top k of the pre-activations; and negative
    encoder biases, so that near the centre fewer than 5 latents fire."""
    import baselines
    g = torch.Generator().manual_seed(seed)
    sae = baselines.make_sae(arch, d_in, d_sae, k=8)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 - (0.4 if name in ("b_enc", "b_gate", "b_mag") else 0))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(d_sae, generator=g) * 2.5 - 1.2)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
    return sae


def numpy_sae(folder, x):
    """(features, reconstruction, margin) of the SAE saved in `folder`, in float64 from config.json and
    sae.safetensors alone, by docs/maths.md sections 1 and 4, independently of the classes and the export.
    margin [rows, d_sae] is each latent's distance from changing its decision (its threshold, 0, or
    the row's k-th largest pre-activation), for leaving rounding ties out."""
    from safetensors.numpy import load_file
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(folder / "sae.safetensors").items()}
    arch = cfg["architecture"]
    h = x - w["b_dec"] if cfg.get("pre_encoder_bias", arch != "relu") else x
    if arch == "gated":
        gate, mag = h @ w["W_enc"] + w["b_gate"], h @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
        f, margin = np.where(gate > 0, np.maximum(mag, 0), 0), np.minimum(np.abs(gate), np.abs(mag))
    else:
        pre = h @ w["W_enc"] + w["b_enc"]
        theta = {"jumprelu": w.get("threshold"), "batchtopk": np.maximum(w.get("threshold", 0), 0)}.get(arch, 0.0)
        if arch == "topk":
            ranked = -np.sort(-pre, axis=1)
            kth = ranked[:, cfg["k"] - 1:cfg["k"]]
            f = np.where(pre >= kth, np.maximum(pre, 0), 0)
            margin = np.minimum(np.abs(pre), (ranked[:, cfg["k"] - 1] - ranked[:, cfg["k"]])[:, None])
        else:
            f, margin = np.where(pre > theta, pre, 0) if arch != "relu" else np.maximum(pre, 0), np.abs(pre - theta)
    return f, f @ w["W_dec"] + w["b_dec"], margin


def _top(f, k):
    """{latent: value} of each row's k largest features that are > 0."""
    order = np.argsort(-f, axis=1, kind="stable")[:, :k]
    return [{int(i): f[r, i] for i in order[r] if f[r, i] > 0} for r in range(len(f))]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_graph_matches_numpy_from_the_saved_files(tmp_path, arch, capsys):
    """The whole-SAE graph, the top-k graph (and infer_onnx.py's reading of it) and the fp16 graph,
    each against the float64 NumPy SAE of the saved files: not against the module that was exported."""
    import infer_onnx
    sae = _random_sae(arch)
    sae_folder.save(sae, tmp_path / "sae")
    x = np.random.default_rng(1).normal(size=(256, 24)).astype(np.float32)
    centre = sae.b_dec.detach().numpy() if getattr(sae, "pre_encoder_bias", arch != "relu") else 0
    x[::2] = x[::2] * 0.05 + centre                                # inputs near the centre: few latents fire
    f_ref, x_hat_ref, margin = numpy_sae(tmp_path / "sae", x.astype(np.float64))
    clear = (margin > 1e-4).all(1)                                 # no decision within float32 rounding
    assert clear.mean() > 0.5 and (f_ref[clear] != 0).any()
    export.export(sae, tmp_path / "sae.onnx", what="sae")
    f, x_hat = _run(tmp_path / "sae.onnx", x)
    np.testing.assert_allclose(f[clear], f_ref[clear], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat[clear], x_hat_ref[clear], rtol=1e-5, atol=1e-4)
    # Top 5 of the features: also where the top 5 of the pre-activations differs (inactive latents).
    export.export(sae, tmp_path / "top.onnx", topk=5)
    sess, meta = infer_onnx.load(str(tmp_path / "top.onnx"))
    got = infer_onnx.encode(sess, meta, x)
    fifth, sixth = -np.sort(-f_ref, axis=1)[:, 4:6].T
    rows = clear & ((fifth - sixth > 1e-4) | (sixth == 0))         # the top 5 is not a rounding tie
    for r in np.flatnonzero(rows):
        top = {int(i): v for i, v in zip(got["indices"][r], got["values"][r]) if v > 0}
        want = _top(f_ref[r:r + 1], 5)[0]
        assert top.keys() == want.keys(), r
        np.testing.assert_allclose([top[i] for i in want], list(want.values()), rtol=1e-5, atol=1e-5)
    l0 = np.minimum((f_ref != 0).sum(1), 5)                        # what the top-5 output shows of each row
    np.testing.assert_array_equal((got["values"][rows] > 0).sum(1), l0[rows])
    np.save(tmp_path / "x.npy", x)
    infer_onnx.main([str(tmp_path / "top.onnx"), str(tmp_path / "x.npy"), "--rows", "256"])
    printed = capsys.readouterr().out.splitlines()
    shown = [line.split(": L0 ")[1].split(", top")[0] for line in printed if line.startswith("row ")]
    np.testing.assert_array_equal(np.array(shown)[rows], [f"{n}" if n < 5 else ">= 5 (all of the top 5 active)"
                                                          for n in l0[rows]])
    active = (got["values"] > 0).sum(1)        # a top-5 export cannot know an L0 above 5: it says "at least"
    assert (active == 5).any() and printed[-1] == (f"mean L0 over 256 rows: at least {active.mean():.1f}, since "
                                                   f"{(active == 5).sum()} rows have all of the top 5 active; export "
                                                   "without --topk for the exact L0.")
    # fp16: float16 weights and products, so decisions within 1e-2 of a boundary may go either way.
    export.export(sae, tmp_path / "half.onnx", fp16=True)
    (f16,) = _run(tmp_path / "half.onnx", x)
    clear16 = margin > 3e-2                                        # each latent's own decision
    assert clear16.mean() > 0.3 and (f_ref[clear16] != 0).any()
    np.testing.assert_allclose(f16[clear16], f_ref[clear16], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("what, fp16, topk", [("encoder", False, None), ("sae", False, None), ("encoder", True, None),
                                              ("sae", False, 5)])
def test_export_main_writes_what_it_is_asked_and_checks_it_on_the_sae_own_activations(
        tiny_acts, tmp_path, capsys, what, fp16, topk):
    """export.main, in-process: the file has the outputs asked for (features or the top-k's indices and
    values, x_hat with --what sae) in the precision asked for, equal to the NumPy SAE of the saved
    files; the check runs on random rows and on the held-out rows of the folder the SAE's metadata
    names; the last line gives the file's size in MiB, what it holds and the tolerance met."""
    manifest = json.loads((tiny_acts / "manifest.json").read_text())
    sae = _sae(d_in=32, d_sae=4096)
    sae.metadata.update({k: manifest[k] for k in ("model", "layer", "site")}, acts=str(tiny_acts), input_scale=1.0)
    sae_folder.save(sae, tmp_path / "sae")
    out = tmp_path / "m.onnx"
    export.main([str(tmp_path / "sae"), "--out", str(out), "--what", what] + ["--fp16"] * fp16
                + ["--topk", str(topk)] * bool(topk))
    lines = capsys.readouterr().out.splitlines()
    rows = manifest["splits"]["heldout"]["rows"]
    assert [line.split(" activations")[0].strip() for line in lines[:-1]] == ["random", "real"]
    assert f"({min(rows, 512)} rows, CPUExecutionProvider)" in lines[1]
    size, tol = out.stat().st_size / 2**20, 2e-2 if fp16 else 1e-5
    assert size > 0.2 and lines[-1] == (f"wrote {out} ({size:.1f} MiB, {what}{', fp16' if fp16 else ''}"
                                        f"{f', top-{topk}' if topk else ''}): matches PyTorch within {tol:g}")
    model = onnx.load(str(out))
    weights = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer if len(t.dims) == 2}
    assert weights == {np.dtype(np.float16 if fp16 else np.float32)}
    x = np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32)
    f_ref, x_hat_ref, margin = numpy_sae(tmp_path / "sae", x.astype(np.float64))
    got = dict(zip([o.name for o in model.graph.output], _run(out, x)))
    assert set(got) == ({"indices", "values"} if topk else {"features"}) | ({"x_hat"} if what == "sae" else set())
    sure = margin > (3e-2 if fp16 else 1e-4)                      # decisions no rounding can flip
    clear = sure.all(1)
    assert sure.mean() > 0.5 and (fp16 or clear.mean() > 0.5)
    tol = dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-5, atol=1e-4)
    if topk:
        for r in np.flatnonzero(clear):
            top = {int(i): v for i, v in zip(got["indices"][r], got["values"][r]) if v > 0}
            assert top.keys() == _top(f_ref[r:r + 1], topk)[0].keys(), r
    else:
        np.testing.assert_allclose(got["features"][sure], f_ref[sure], **tol)
    if what == "sae":
        np.testing.assert_allclose(got["x_hat"][clear], x_hat_ref[clear], **tol)


def test_export_main_refuses_activations_of_another_layer_unless_told(tiny_acts, tmp_path, capsys):
    """An SAE whose metadata names another layer than the --acts folder is refused in one line that
    names both folders; --allow-mismatch checks on them anyway. A folder named in the metadata that
    is gone leaves the check to random rows, with a note."""
    manifest = json.loads((tiny_acts / "manifest.json").read_text())
    sae = _sae(d_in=32, d_sae=64)
    sae.metadata.update(model=manifest["model"], layer=manifest["layer"] + 1, site=manifest["site"])
    sae_folder.save(sae, tmp_path / "sae")
    argv = [str(tmp_path / "sae"), "--out", str(tmp_path / "m.onnx"), "--acts", str(tiny_acts)]
    with pytest.raises(SystemExit) as info:
        export.main(argv)
    assert str(info.value) == (f"error: {tmp_path / 'sae'} was trained on layer {manifest['layer'] + 1} but {tiny_acts} "
                               f"holds layer {manifest['layer']}; pass the activations it was trained on, or "
                               "--allow-mismatch to compare them on purpose.")
    export.main(argv + ["--allow-mismatch"])
    assert "  real activations" in capsys.readouterr().out
    sae.metadata["acts"] = str(tmp_path / "gone")
    sae_folder.save(sae, tmp_path / "sae")
    export.main(argv[:3])
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'gone'} is not here; checking on random inputs only." in out
    assert "real activations" not in out and "random activations" in out


# --- The check itself: near_boundary's bound, and verify() against graphs made wrong to order ----

def _hand_built(arch):
    """A d_in 2 SAE of `arch` whose every number is a short binary fraction, so that float32 holds the
    decision quantities and their rounding bounds exactly: x = [3, 0], b_dec = [1, 0], W_enc's first
    row `w` and its second 0, so h = [2, 0] (x itself for ReLU, which does not centre) and hW = h_0 w.
    Returns the SAE, x, the tie_tol, and the bound and mask near_boundary must give, worked by hand."""
    import baselines
    cols = {"jumprelu": 4, "relu": 4, "batchtopk": 4, "topk": 5, "gated": 4}[arch]
    if arch == "jumprelu":
        sae = JumpReLUSAE(2, cols, pre_encoder_bias=True)
    else:
        sae = baselines.make_sae(arch, 2, cols, k=2 if "topk" in arch else None)
    w, tie_tol = torch.ones(cols), 0.5
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
        if arch == "jumprelu":     # pre = 2 + 2 = 4, bound = (2 + 2) / 2 = 2; |pre - theta| = 2, 2.5, 2.5, 1.75
            sae.b_enc.fill_(2.0)
            sae.log_threshold.copy_(exact_log(torch.tensor([2.0, 1.5, 6.5, 5.75])))
            bound, mask = [2, 2, 2, 2], [True, False, False, True]
        if arch == "relu":         # h = x: pre = 3 + b = -6, -7, -5, 4; bound = (3 + |b|) / 2 = 6, 6.5, 5.5, 2
            sae.b_enc.copy_(torch.tensor([-9.0, -10.0, -8.0, 1.0]))
            bound, mask = [6, 6.5, 5.5, 2], [True, False, True, False]
        if arch == "batchtopk":    # pre - theta = -3.5, -4.5, -2.5, 2.5 with theta 0.5; bound 3.5, 4, 3, 1.5
            sae.b_enc.copy_(torch.tensor([-5.0, -6.0, -4.0, 1.0]))
            sae.threshold.fill_(0.5)
            bound, mask = [3.5, 4, 3, 1.5], [True, False, True, False]
        if arch == "topk":         # tie_tol 1/8; pre = 4, -1/4, 8, 3.5, 5 so the 2nd largest (k = 2) is 5
            tie_tol, w[1] = 0.125, 7 / 16
            sae.b_enc.copy_(torch.tensor([2.0, -9 / 8, 6.0, 1.5, 3.0]))
            # |pre - kth| = 1 = 2 * bound; |pre| = 1/4 = bound; 3 > 2 * 1; 1.5 > 2 * 7/16; the k-th itself
            bound, mask = [0.5, 0.25, 1, 7 / 16, 5 / 8], [True, True, False, False, True]
        if arch == "gated":        # bound = 1 * max(e^r_mag, 1) + max(|b_gate|, |b_mag|) / 2
            sae.r_mag.copy_(exact_log(torch.tensor([1.0, 1.0, 2.0, 1.0])))
            sae.b_gate.copy_(torch.tensor([-6.0, 6.0, 8.0, -7.0]))   # gate = 2 + b_gate = -4, 8, 10, -5
            sae.b_mag.copy_(torch.tensor([6.0, -6.0, -12.0, 7.0]))   # mag = 2 e^r_mag + b_mag = 8, -4, -8, 9
            bound, mask = [4, 4, 8, 4.5], [True, True, True, False]   # |gate|, |mag|, |mag| at it; 5 beyond
        sae.W_enc.copy_(torch.stack([w, torch.zeros(cols)]))
    return sae, np.array([[3.0, 0.0]], np.float32), tie_tol, np.array([bound], np.float32), np.array([mask])


@pytest.mark.parametrize("arch", ARCHS)
def test_near_boundary_marks_decisions_at_the_rounding_bound_and_none_beyond(arch):
    """near_boundary's bound is tie_tol * (|h| @ |W_enc| + |bias|), with h = x - b_dec where the SAE
    centres its input (Gated: the magnitude path's scale and the larger bias); a latent is near when
    its decision quantity (pre - theta, pre, the gate or the magnitude, the distance to the row's k-th
    largest pre-activation, within twice the bound) is at most the bound: at it exactly counts, past it not."""
    sae, x, tie_tol, bound, mask = _hand_built(arch)
    got_mask, got_bound = export.near_boundary(sae, x, tie_tol)
    np.testing.assert_array_equal(np.broadcast_to(got_bound, bound.shape), bound)
    np.testing.assert_array_equal(got_mask, mask)


class _Edited:
    """An onnxruntime session whose outputs pass through edit(outputs, x) first: a wrong graph, made to order."""

    def __init__(self, sess, edit):
        self.sess, self.edit = sess, edit

    def run(self, names, feeds):
        return self.edit([out.copy() for out in self.sess.run(names, feeds)], feeds["x"])

    def get_providers(self):
        return self.sess.get_providers()


_SESSION = export.session


def _verify_edited(monkeypatch, path, module, sae, edit, **kw):
    """export.verify against the file's outputs as `edit` changes them."""
    monkeypatch.setattr(export, "session", lambda p: _Edited(_SESSION(p), edit))
    return export.verify(path, module, sae, **kw)


def test_verify_catches_a_whole_sae_graph_whose_x_hat_alone_is_wrong(tmp_path, monkeypatch):
    """x_hat is checked in its own right: a graph with the right features and x_hat 1e-3 too large fails."""
    sae = _sae()
    module = export.export(sae, tmp_path / "m.onnx", what="sae")

    def edit(out, x):
        out[1] *= 1.001
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, edit, rows=100)
    assert not ok and 5e-4 < reports["random"]["max_rel"] < 2e-3, reports


def test_verify_catches_a_top_k_graph_with_a_wrong_value_or_a_wrong_index(tmp_path, monkeypatch):
    """With --topk, a value 1e-3 off fails the check, and so does a right value under the wrong index:
    a small active latent (below 1) reported as a latent that is far below its threshold."""
    sae = _sae()
    module = export.export(sae, tmp_path / "m.onnx", topk=8)

    def wrong_value(out, x):
        out[1][:, 0] *= 1.001
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, wrong_value, rows=100)
    assert not ok and 5e-4 < reports["random"]["max_rel"] < 2e-3, reports

    def wrong_index(out, x):
        indices, values = out
        with torch.no_grad():
            far_below = (sae.pre_acts(torch.from_numpy(x)) - sae.threshold).argmin(1).numpy()
        r, i = np.argwhere((values > 0) & (values < 1))[0]
        indices[r, i] = far_below[r]
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, wrong_index, rows=100)
    assert not ok and reports["random"]["max_rel"] == float("inf") and reports["random"]["ties"] == 1, reports


def test_top_k_rows_where_fewer_than_k_fire_verify_whichever_inactive_latents_fill_them(tmp_path, monkeypatch):
    """Where fewer than k latents fire, the top k is padded with zeros under any inactive latents; a
    runtime that picks other ones than PyTorch's is right, with no row left out as a tie."""
    sae = _sae()
    module = export.export(sae, tmp_path / "m.onnx", topk=90)

    def other_zeros(out, x):         # each padding zero moved to a latent the output does not name
        indices, values = out
        for r in range(len(x)):
            unnamed = np.setdiff1d(np.arange(96), indices[r])
            zeros = np.flatnonzero(values[r] == 0)[:len(unnamed)]
            indices[r, zeros] = unnamed[:len(zeros)]
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, other_zeros, rows=100)
    assert ok and reports["random"]["ties"] == 0 and reports["random"]["max_rel"] < 1e-5, reports


def _tie_in_even_rows(rows=20):
    """An SAE whose latent 0 is exactly at its threshold where x_0 = 0 (the even rows of x) and far
    from it elsewhere, and x."""
    sae = _sae()
    with torch.no_grad():
        sae.W_enc[:, 0] = 0
        sae.W_enc[0, 0] = 1
        sae.b_enc[0] = sae.threshold[0]
    x = np.random.default_rng(4).standard_normal((rows, 24)).astype(np.float32)
    x[:, 0] = np.where(np.arange(rows) % 2 == 0, 0, 2 + np.abs(x[:, 0]))
    return sae, x


def test_compare_reports_rows_ties_and_the_largest_errors(tmp_path):
    """compare()'s report on a hand-made case: the rows checked, the rows left out as ties (a latent at
    its threshold flipped; with --topk and x_hat, every row with a latent at its threshold), and the
    largest absolute error and that error over the largest reference value; a latent flipped away from
    any threshold makes both errors infinite, and counts its rows."""
    sae, x = _tie_in_even_rows()
    tie_tol = 8 * 2.0**-24
    at_threshold, _ = export.near_boundary(sae, x, tie_tol)
    assert (at_threshold.any(1) == (np.arange(20) % 2 == 0)).all()
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(x)).numpy()
    module = export.export(sae, tmp_path / "m.onnx")

    def edited(edit, path=tmp_path / "m.onnx"):
        return _Edited(export.session(path), edit)

    def tie_and_error(out, x):       # row 2: latent 0 flipped at its threshold; row 1: one value 2^-10 off
        out[0][2, 0] = sae.threshold[0].item()
        out[0][1, np.flatnonzero(out[0][1])[0]] += 2.0**-10
        return out
    report = export.compare(edited(tie_and_error), module, sae, x, tie_tol)
    scale = np.abs(np.delete(want, 2, axis=0)).max()
    assert scale > 1.5 and report == {"rows": 20, "ties": 1, "max_abs": pytest.approx(2.0**-10, rel=1e-3),
                                      "max_rel": pytest.approx(2.0**-10 / scale, rel=1e-3)}

    def flips(out, x):               # rows 1 and 3: latent 0, far above its threshold there, turned off
        out[0][[1, 3], 0] = 0
        return out
    inf = float("inf")
    assert export.compare(edited(flips), module, sae, x, tie_tol) == {"rows": 20, "ties": 2, "max_abs": inf, "max_rel": inf}

    top = export.export(sae, tmp_path / "top.onnx", topk=8)

    def wrong_in_a_tie_row(out, x):  # row 0 has latent 0 at its threshold, yet its values are checked
        out[1][0, 0] *= 1.01
        return out
    report = export.compare(edited(wrong_in_a_tie_row, tmp_path / "top.onnx"), top, sae, x, tie_tol)
    assert report["ties"] == 0 and report["max_rel"] > 1e-3, report
    top_sae = export.export(sae, tmp_path / "top_sae.onnx", topk=8, what="sae")
    report = export.compare(export.session(tmp_path / "top_sae.onnx"), top_sae, sae, x, tie_tol)
    assert report["ties"] == 10 and report["max_rel"] < 1e-5, report


def test_a_top_k_x_hat_that_no_row_can_check_is_reported_unverified(tmp_path, capsys):
    """With --topk and --what sae, a row with a latent at its threshold cannot have its x_hat checked
    (the outputs show only k latents); when that is every row, compare() says so, verify() fails, and
    export.py exits naming x_hat and what to do instead. Without x_hat the same SAE verifies."""
    sae = _at_threshold_latents(_sae())                    # latent 0 at its threshold in every row
    sae_folder.save(sae, tmp_path / "sae")
    module = export.export(sae, tmp_path / "m.onnx", what="sae", topk=8)
    x = np.random.default_rng(0).standard_normal((30, 24)).astype(np.float32)
    inf = float("inf")
    report = export.compare(export.session(tmp_path / "m.onnx"), module, sae, x, 8 * 2.0**-24)
    assert report == {"rows": 30, "ties": 30, "max_abs": inf, "max_rel": inf, "unverified": "x_hat"}
    ok, reports, _, _ = export.verify(tmp_path / "m.onnx", module, sae, rows=30)
    assert not ok and reports["random"]["unverified"] == "x_hat"
    with pytest.raises(SystemExit) as info:
        export.main([str(tmp_path / "sae"), "--out", str(tmp_path / "m.onnx"), "--what", "sae", "--topk", "8"])
    assert str(info.value).startswith("error: every row has a latent within rounding of its threshold, so x_hat could not be")
    assert "max abs error inf, max rel error inf (512 rows with an at-threshold tie left out)" in capsys.readouterr().out
    module = export.export(sae, tmp_path / "e.onnx", topk=8)
    ok, reports, _, _ = export.verify(tmp_path / "e.onnx", module, sae, rows=30)
    assert ok and reports["random"]["ties"] == 0, reports


def test_an_sae_that_fires_nowhere_verifies_with_zero_error(tmp_path):
    """Thresholds far above every pre-activation: no latent fires, the features are all 0 in both
    runtimes, and the check passes with errors of exactly 0."""
    sae = _sae()
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(100.0))
    for kw in ({}, {"topk": 4}):
        module = export.export(sae, tmp_path / "m.onnx", **kw)
        ok, reports, _, _ = export.verify(tmp_path / "m.onnx", module, sae, rows=50)
        assert ok and reports["random"]["max_abs"] == reports["random"]["max_rel"] == 0.0, (kw, reports)


def test_verify_forgives_a_flip_within_float32_rounding_and_no_further(tmp_path, monkeypatch):
    """A latent one float above its threshold that the runtime turns off is a tie (the row is left out);
    a latent 1e-4 of its threshold below it that the runtime turns on is an error: far beyond float32
    rounding (8 unit roundoffs of the dot product), though within float16's."""
    sae = _at_threshold_latents(_sae())
    with torch.no_grad():
        sae.W_enc[:, 3] = 0
        sae.b_enc[3] = sae.threshold[3] * (1 - 1e-4)
    module = export.export(sae, tmp_path / "m.onnx")

    def off(out, x):
        out[0][0, 1] = 0
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, off, rows=50)
    assert ok and reports["random"]["ties"] == 1, reports

    def on(out, x):
        out[0][0, 3] = sae.b_enc[3].item()
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, on, rows=50)
    assert not ok and reports["random"]["max_rel"] == float("inf") and "unverified" not in reports["random"], reports


def test_verify_draws_random_rows_at_the_sae_input_scale_and_the_same_rows_each_time(tmp_path, monkeypatch):
    """The random rows are in raw activation space, of norm about 1 / input_scale (1 when the metadata
    has none), and drawn from a fixed seed: two checks see the same rows and report the same errors,
    and a tolerance equal to the error found passes (it is inclusive)."""
    seen = []

    def record(out, x):
        seen.append(x.copy())
        return out

    def off(out, x):
        out[0] *= 1.001
        return out
    for input_scale in (0.5, None):
        sae = _sae()
        if input_scale is None:
            del sae.metadata["input_scale"]
        module = export.export(sae, tmp_path / "m.onnx")
        first = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, record)
        norm = np.linalg.norm(seen[-1], axis=1).mean()
        assert len(seen[-1]) == 512 and norm == pytest.approx(1 / (input_scale or 1.0), rel=0.05)
        assert _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, record)[1] == first[1]
        np.testing.assert_array_equal(seen[-1], seen[-2])
    max_rel = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, off)[1]["random"]["max_rel"]
    assert max_rel > 0 and _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, off, tol=max_rel)[0]


def test_the_graph_with_its_defaults_is_the_float32_encoder(tmp_path):
    """export.Graph(sae), as a notebook would build it, returns the SAE's own float32 features as a
    tensor (not a tuple of one)."""
    sae = _sae()
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((20, 24)).astype(np.float32))
    with torch.no_grad():
        got, want = export.Graph(sae)(x), sae.encode(x)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("topk", [1, 96])
def test_topk_may_be_any_count_from_1_to_d_sae(tmp_path, topk):
    """--topk 1 and --topk d_sae both export and verify; 0 and d_sae + 1 are refused."""
    sae = _sae()
    module = export.export(sae, tmp_path / "m.onnx", topk=topk)
    indices, values = _run(tmp_path / "m.onnx", np.zeros((3, 24), np.float32))
    assert indices.shape == values.shape == (3, topk)
    assert export.verify(tmp_path / "m.onnx", module, sae, rows=50)[0]
    for bad in (0, 97):
        with pytest.raises(ValueError, match="--topk must be between 1 and d_sae=96"):
            export.export(sae, tmp_path / "bad.onnx", topk=bad)


def test_the_file_is_opset_17_with_a_batch_axis_and_says_what_it_holds(tmp_path):
    """The file is ONNX opset 17, its input and outputs have a dynamic axis named batch, and its
    metadata says what it holds (what, fp16, topk) and what its input is."""
    export.export(_sae(), tmp_path / "m.onnx", what="sae", fp16=True, topk=5)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert (meta["what"], meta["fp16"], meta["topk"]) == ("sae", True, 5) and "float32 [batch, d_in]" in meta["input"]


def test_fp16_batchtopk_compares_with_its_float32_threshold(tmp_path):
    """BatchTopK's global threshold stays float32 in a float16 graph: with theta a quarter float16 step
    below 0.5 (float16 would round it up to 0.5), a pre-activation of exactly 0.5 fires."""
    sae = _baseline("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(0.5 - 2.0**-13)
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = 0.5
    export.export(sae, tmp_path / "m.onnx", fp16=True)
    f = _run(tmp_path / "m.onnx", np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32))[0]
    assert (f[:, 0] == 0.5).all()


def test_a_pre_activation_at_its_threshold_is_inactive_for_every_threshold(tmp_path):
    """Latent by latent, a pre-activation exactly at its threshold stays inactive in ONNX, for 2000
    thresholds spread over [0.01, 10]: the graph holds theta as a constant, where computing it as
    exp(log theta) in the runtime misses PyTorch's theta in the last bit for some of them."""
    sae = _sae(d_sae=2000)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(math.log(0.01), math.log(10), 2000))
        sae.W_enc.zero_()
        sae.b_enc.copy_(sae.threshold)
    export.export(sae, tmp_path / "m.onnx")
    f = _run(tmp_path / "m.onnx", np.ones((2, 24), np.float32))[0]
    assert (f == 0).all()


def test_a_top_k_swap_is_a_tie_within_twice_the_bound_of_the_kth_value_or_at_a_threshold(tmp_path):
    """With --topk, a runtime may swap the row's k-th latent for one whose value is within twice the
    rounding bound of the k-th value (it is left out as a tie), or show a latent that is exactly at its
    threshold; a latent 2.5 bounds from the k-th value is an error. Hand-made so that float32 is exact:
    x = [2, 0], W_enc's first row 1, so pre = 2 + b_enc = 8, 5, 4, 3.75, 2.5 and, with tie_tol 1/8, the
    bound is (2 + b_enc) / 8 = 1, 5/8, 1/2, 15/32, 5/16; thresholds 1/4 but 2.5 for the last latent."""
    sae = JumpReLUSAE(2, 5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0] * 5, [0.0] * 5]))
        sae.b_enc.copy_(torch.tensor([6.0, 3.0, 2.0, 1.75, 0.5]))
        sae.b_dec.zero_()
        sae.log_threshold.copy_(exact_log(torch.tensor([0.25, 0.25, 0.25, 0.25, 2.5])))
    module = export.export(sae, tmp_path / "m.onnx", topk=2)      # top 2: latents 0 and 1 (8, 5)
    x = np.array([[2.0, 0.0]] * 2, np.float32)

    def shown_in_row_0(latent, value):
        def edit(out, x):
            out[0][0], out[1][0] = [0, latent], [8.0, value]
            return out
        return _Edited(export.session(tmp_path / "m.onnx"), edit)
    inf = float("inf")
    for latent, value, ties, max_rel in ((2, 4.0, 1, 0.0),      # |4 - 5| = 1 = 2 * 1/2: a tie
                                         (4, 2.5, 1, 0.0),      # pre = theta: a tie
                                         (3, 3.75, 1, inf)):    # |3.75 - 5| = 1.25 = 2.67 * 15/32: an error
        report = export.compare(shown_in_row_0(latent, value), module, sae, x, 0.125)
        assert (report["ties"], report["max_rel"]) == (ties, max_rel), (latent, report)


def test_export_main_checks_against_the_tolerance_it_is_given(tmp_path, capsys):
    """--tol replaces the default tolerance: the last line names it, and an fp16 export checked at 1e-9
    exits with an error that names the file as untrustworthy."""
    sae = _sae()
    sae_folder.save(sae, tmp_path / "sae")
    export.main([str(tmp_path / "sae"), "--out", str(tmp_path / "m.onnx"), "--tol", "0.001"])
    assert capsys.readouterr().out.splitlines()[-1].endswith("): matches PyTorch within 0.001")
    with pytest.raises(SystemExit) as info:
        export.main([str(tmp_path / "sae"), "--out", str(tmp_path / "h.onnx"), "--fp16", "--tol", "1e-9"])
    assert str(info.value) == (f"error: the ONNX output differs from PyTorch by more than 1e-09 (relative); "
                               f"{tmp_path / 'h.onnx'} is not trustworthy.")


def test_verify_checks_the_first_held_out_rows_of_the_folder_as_float32(tmp_path, monkeypatch):
    """The real-activation check reads the first `rows` rows of the folder's held-out split (never the
    training split), as float32 whatever the folder stores (here float16)."""
    import acts
    folder = tmp_path / "acts"
    manifest = acts.new_manifest(dict(model="tiny", gguf_file=None, layer=1, site="resid", context=4, dtype="float16",
                                      heldout_every=5, source={"text": "t"}), "model.layers.1", 24)
    for split in acts.SPLITS:
        (folder / split).mkdir(parents=True)
    rng = np.random.default_rng(6)
    train, heldout = (rng.standard_normal((n, 24)).astype(np.float16) for n in (40, 30))
    acts.append_shard(folder, manifest, "train", train, np.zeros((1, 4), np.int32))
    acts.append_shard(folder, manifest, "heldout", heldout, np.zeros((1, 4), np.int32))
    sae = _sae()
    module = export.export(sae, tmp_path / "m.onnx")
    seen = []

    def record(out, x):
        seen.append(x.copy())
        return out
    ok, reports, _, _ = _verify_edited(monkeypatch, tmp_path / "m.onnx", module, sae, record, acts_dir=folder, rows=20)
    assert ok and reports["real"]["rows"] == 20, reports
    assert seen[-1].dtype == np.float32 and (seen[-1] == heldout[:20].astype(np.float32)).all()


@pytest.mark.parametrize("torch_cuda, ort_providers, want", [
    (True, ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]),
    (False, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),   # onnxruntime-gpu, no GPU
    (True, ["CPUExecutionProvider"], ["CPUExecutionProvider"])])                            # plain onnxruntime
def test_session_asks_for_cuda_without_tf32_only_where_torch_and_onnxruntime_both_have_it(
        monkeypatch, torch_cuda, ort_providers, want):
    """The providers session() asks onnxruntime for, read off the call; on a machine without a GPU
    onnxruntime falls back to the CPU whatever it is asked, so only the request tells them apart
    (test_cuda.py checks the session it gets on a GPU)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_cuda)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ort_providers)
    monkeypatch.setattr(ort, "InferenceSession", lambda path, **kw: asked.append((path, kw)))
    export.session(Path("m.onnx"))
    assert asked == [("m.onnx", {"providers": want})]
