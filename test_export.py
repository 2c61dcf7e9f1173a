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
from jumprelu import JumpReLUSAE, exact_log

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
    sae.save(tmp_path / "sae")
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
    assert rows and all(r["max_rel_diff"] <= 1e-4 and r["onnxruntime_tokens_per_s"] > 0 for r in rows)
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
    with torch.no_grad():     # against the SAE's own encode (SPEC section 4), not the export's graph
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
    sae.save(tmp_path / "sae")
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
    pre = x.astype(np.float64) @ w["W_enc"] + w["b_enc"]             # SPEC section 1, in float64
    want = np.where(pre > w["threshold"], pre, 0.0)
    assert (want[:, [0, 2]] == 0).all() and (want[:, 1] != 0).all()
    assert (got[:, [0, 2]] == 0).all() and (got[:, 1] != 0).all()
    tie = np.abs(pre - w["threshold"]) <= 8 * 2.0**-24 * (np.abs(x) @ np.abs(w["W_enc"]) + np.abs(w["b_enc"]))
    flipped = (got != 0) != (want != 0)
    assert not (flipped & ~tie).any()
    both = (got != 0) & (want != 0)
    assert np.abs(got - want)[both].max() <= 1e-6 * np.abs(want).max()


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
    sae.safetensors alone, by SPEC sections 1 and 4, independently of the classes and the export.
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
    sae.save(tmp_path / "sae")
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
    printed = [int(line.split(": L0 ")[1].split(",")[0]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("row ")]
    np.testing.assert_array_equal(np.array(printed)[rows], l0[rows])
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
    sae.save(tmp_path / "sae")
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
    sae.save(tmp_path / "sae")
    argv = [str(tmp_path / "sae"), "--out", str(tmp_path / "m.onnx"), "--acts", str(tiny_acts)]
    with pytest.raises(SystemExit) as info:
        export.main(argv)
    assert str(info.value) == (f"error: {tmp_path / 'sae'} was trained on layer {manifest['layer'] + 1} but {tiny_acts} "
                               f"holds layer {manifest['layer']}; pass the activations it was trained on, or "
                               "--allow-mismatch to compare them on purpose.")
    export.main(argv + ["--allow-mismatch"])
    assert "  real activations" in capsys.readouterr().out
    sae.metadata["acts"] = str(tmp_path / "gone")
    sae.save(tmp_path / "sae")
    export.main(argv[:3])
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'gone'} is not here; checking on random inputs only." in out
    assert "real activations" not in out and "random activations" in out
