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
from jumprelu import JumpReLUSAE

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
    sae = _at_threshold_latents(_sae())
    export.export(sae, tmp_path / "m.onnx", fp16=fp16)
    f = _run(tmp_path / "m.onnx", np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32))[0]
    if not fp16:    # float16 rounds b_enc, so only float32 can place pre exactly at theta
        assert (f[:, 0] == 0).all() and (f[:, 1] != 0).all() and (f[:, 2] == 0).all()
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
