"""The tests only a CUDA device can run: the code that chooses the GPU, moves tensors to it, runs under
its autocast or waits for it. Skipped where torch sees no GPU (CI); tools/gpu_check.py runs them
with the rest of the suite on a GPU machine. Other files parametrise their tests over "cuda" too
(test_jumprelu.py's DEVICES, the fused-Adam checkpoint test of test_train.py)."""

import numpy as np
import pytest
import torch

import evaluate
import export
import formats
import harvest
import sae_folder
import train
from jumprelu import JumpReLUSAE
from test_evaluate import _identity_sae, _Tokens
from test_train import _log

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_onnx_session_runs_on_cuda_without_tf32(tmp_path):
    export.export(JumpReLUSAE(16, 64), tmp_path / "m.onnx")
    sess = export.session(tmp_path / "m.onnx")
    assert sess.get_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert sess.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"


def test_thresholds_load_onto_cuda_exactly_as_saved(tmp_path):
    """CUDA's exp differs from the CPU's in the last bit for some inputs: the log of each threshold
    is found on the device the SAE is loaded onto, so that its exp there gives the saved threshold."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(16, 4096)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.randn(4096))
    sae.metadata = {"model": "smollm2", "layer": 6, "site": "resid", "hook": "model.layers.6"}
    sae_folder.save(sae, tmp_path / "ours")
    formats.save_saelens(sae, tmp_path / "saelens")
    for loaded in (sae_folder.load(tmp_path / "ours", device="cuda"), formats.load_saelens(tmp_path / "saelens", "cuda")):
        assert torch.equal(loaded.threshold.cpu(), sae.threshold)
    assert not torch.equal(sae.log_threshold.exp(), sae.log_threshold.cuda().exp().cpu())   # the case this is about


def test_evaluate_on_cuda_gives_the_cpus_figures_with_the_lm_in_bfloat16(tiny_acts, tmp_path, monkeypatch):
    """Every metric on the GPU: the activation metrics are the CPU's up to float32 rounding; the LM
    runs in bfloat16 there (float32 on the CPU), so its cross-entropies agree to bfloat16's precision."""
    torch.manual_seed(0)
    sae_folder.save(JumpReLUSAE(32, 64, threshold_init=0.005), tmp_path / "sae")
    loaded, load_model = [], harvest.load_model

    def spy(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        loaded.append((next(model.parameters()).device.type, next(model.parameters()).dtype))
        return model, tokenizer

    monkeypatch.setattr(harvest, "load_model", spy)
    (gpu,) = evaluate.evaluate([tmp_path / "sae"], tiny_acts, lm=True, lm_windows=4, device="cuda", progress=False)
    (cpu,) = evaluate.evaluate([tmp_path / "sae"], tiny_acts, lm=True, lm_windows=4, device="cpu", progress=False)
    assert loaded == [("cuda", torch.bfloat16), ("cpu", torch.float32)]
    assert 0 < cpu["l0"] < 64
    for key in ("l0", "mse", "fvu", "dead_fraction"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-2, abs=1e-6), key
    for key in ("ce_clean", "ce_zero", "ce_spliced"):
        assert gpu[key] == pytest.approx(cpu[key], rel=3e-2), key


def test_top_contexts_on_cuda_are_the_cpus():
    rows = np.random.default_rng(0).random((5000, 3)).astype(np.float16)
    windows = np.arange(250 * 21).reshape(250, 21)
    texts = [evaluate.top_contexts(_identity_sae(3).to(device), [(rows, windows)], _Tokens(), [0, 2], 20, device=device)
             for device in ("cpu", "cuda")]
    assert texts[0] == texts[1] and "t" in texts[0]


def test_train_on_cuda_runs_every_forward_under_bfloat16_autocast(tiny_acts, tmp_path, monkeypatch):
    """Training on the GPU, where autocast is on by default: the training loss and the held-out batch
    both run in bfloat16, not in CUDA autocast's own default, float16."""
    seen, pre_acts = [], JumpReLUSAE.pre_acts

    def spy(self, x_BD):
        seen.append((x_BD.device.type, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        return pre_acts(self, x_BD)

    monkeypatch.setattr(JumpReLUSAE, "pre_acts", spy)
    train.train(tiny_acts, tmp_path / "run", d_sae=64, steps=8, target_l0=4, batch_size=128, log_every=2,
                checkpoint_every=4, quiet=True, device="cuda", path="dense", compile=False)
    under_autocast = [dtype for device, enabled, dtype in seen if enabled]
    assert {device for device, _, _ in seen} == {"cuda"}
    assert len(under_autocast) >= 8 + 4 and set(under_autocast) == {torch.bfloat16}   # 8 steps, 4 held-out batches
    assert sae_folder.load(tmp_path / "run").W_enc.isfinite().all()


def test_matmul_ceiling_times_the_gpus_work_not_its_launch():
    """matmul_ceiling against CUDA events round one 8192^3 bfloat16 product: without its first
    synchronize it would time the warm-up product too (half the figure), without its second only
    the launch (many times the figure)."""
    n = 8192
    ceiling = train.matmul_ceiling("cuda", n, n, n, torch.bfloat16, repeats=1)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a @ a
    torch.cuda.synchronize()
    start.record()
    a @ a
    end.record()
    end.synchronize()
    measured = 2 * n**3 / (start.elapsed_time(end) / 1e3)
    assert 0.7 < ceiling / measured < 1.4, (ceiling, measured)


def test_train_compiles_jumprelus_loss_on_cuda_by_default_and_stays_on_the_cpu_when_told(tiny_acts, tmp_path,
                                                                                        monkeypatch):
    """On a GPU machine: JumpReLU's loss compiled by default (TopK's AuxK is not: it recompiles every
    step), and device="cpu" trains on the CPU, not on the GPU that torch would pick by default."""
    compiled, devices, real, pre_acts = [], set(), train.loss_functions, JumpReLUSAE.pre_acts
    monkeypatch.setattr(train, "loss_functions", lambda sae, hp, target_l0, world, compile_loss:
                        compiled.append((sae.architecture, compile_loss)) or real(sae, hp, target_l0, world, compile_loss))
    monkeypatch.setattr(JumpReLUSAE, "pre_acts", lambda self, x: devices.add(x.device.type) or pre_acts(self, x))
    for arch, device in (("jumprelu", "cuda"), ("topk", "cuda"), ("jumprelu", "cpu")):
        train.train(tiny_acts, tmp_path / f"{arch}_{device}", arch=arch, d_sae=64, steps=2, target_l0=4, batch_size=128,
                    checkpoint_every=2, quiet=True, device=device)
        if device == "cpu":
            assert devices == {"cpu"}
        devices.clear()
    assert compiled == [("jumprelu", True), ("topk", False), ("jumprelu", False)]


def test_train_on_cuda_fuses_adam_takes_bf16s_sparse_rule_and_calibrates_batchtopk_there(tiny_acts, tmp_path,
                                                                                         monkeypatch):
    """On CUDA: Adam is fused; under bf16 autocast (the default there) the auto path goes sparse only
    below 0.1% of the latents firing (SPARSE_BELOW), so a run at about 0.8% stays dense, where float32's
    rule (2%) goes sparse; BatchTopK's calibration batches are on the GPU with its SAE."""
    fused, make_optimizer = [], train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *args: (opt := make_optimizer(*args), fused.append(
        opt.defaults["fused"]))[0])
    kw = dict(target_l0=4, batch_size=128, steps=8, log_every=1, checkpoint_every=8, quiet=True, device="cuda",
              compile=False)

    for name, autocast in (("bf16", None), ("float32", False)):
        record = train.train(tiny_acts, tmp_path / name, d_sae=512, autocast=autocast, **kw)
        assert record["l0"] < 0.02 * 512
    assert {r["path"] for r in _log(tmp_path / "bf16")} == {"dense"}
    assert "sparse" in [r["path"] for r in _log(tmp_path / "float32")]
    record = train.train(tiny_acts, tmp_path / "batchtopk", arch="batchtopk", d_sae=64, **kw)
    assert record["threshold"] > 0 and fused == [True, True, True]
