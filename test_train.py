"""Tests for train.py: the paper's schedules, the activation stream, the input scale, resume."""

import functools
import inspect
import itertools
import json
import math
import types

import numpy as np
import pytest
import torch

import acts
import anthropic
import formats
import penalties
import sae_folder
import train
from baselines import BatchTopKSAE, TopKSAE
from jumprelu import JumpReLUSAE
from test_evaluate import _acts_copy


def test_the_paper_recipe_is_the_papers():
    p = train.RECIPES["paper"]
    assert (p["lr"], p["betas"], p["batch_size"], p["bandwidth"], p["threshold_init"]) == (7e-5, (0.0, 0.999), 4096, 0.001, 0.001)
    assert (p["lr_warmup_steps"], p["l0_warmup_steps"], p["lr_decay_fraction"]) == (1000, 10_000, 0.0)


def test_lr_cosine_warmup_from_a_tenth_then_constant():
    lr = lambda s: train.lr_at(s, 100_000, 7e-5, 1000)
    assert lr(0) == pytest.approx(7e-6)
    assert lr(500) == pytest.approx(7e-5 * (0.1 + 0.9 * 0.5))         # half-way up the cosine
    assert lr(250) == pytest.approx(7e-5 * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 4))))
    assert lr(1000) == lr(99_999) == pytest.approx(7e-5)
    assert all(lr(s) <= lr(s + 1) for s in range(0, 1000, 7))
    assert train.lr_at(0, 100, 1e-3, 0) == 1e-3                              # --lr-warmup-steps 0: none


def test_lr_linear_decay_over_the_last_fraction():
    lr = lambda s: train.lr_at(s, 1000, 1e-3, 10, decay_fraction=0.2)
    assert lr(799) == pytest.approx(1e-3) and lr(800) == pytest.approx(1e-3)
    assert lr(900) == pytest.approx(5e-4) and lr(1000) == 0.0


def test_l0_coefficient_linear_warmup():
    assert train.l0_coefficient_at(0, 2.0, 10_000) == 0.0
    assert train.l0_coefficient_at(2_500, 2.0, 10_000) == pytest.approx(0.5)
    assert train.l0_coefficient_at(10_000, 2.0, 10_000) == train.l0_coefficient_at(50_000, 2.0, 10_000) == 2.0
    assert train.l0_coefficient_at(0, 2.0, 1) == 0.0 and train.l0_coefficient_at(1, 2.0, 1) == 2.0     # one step of warm-up
    assert train.l0_coefficient_at(0, 2.0, 0) == 2.0 and train.l0_coefficient_at(5, None, 10) is None   # none; TopK's


def test_target_l0_controller_settles_on_the_target():
    # A plant whose L0 falls as lambda grows, with lag: the controller must find lambda for L0 = 40.
    controller, l0 = train.TargetL0(40, l0_coefficient=1e-4), 500.0
    history = []
    for _ in range(600):
        l0 += 0.2 * (3.0 / math.sqrt(controller.value) - l0)
        controller.update(l0)
        history.append(l0)
    assert l0 == pytest.approx(40, rel=0.02)
    assert controller.value == pytest.approx((3.0 / 40) ** 2, rel=0.05)
    assert min(history) > 0.8 * 40                                  # no deep undershoot on the way


def _adam_like_plant(controller, steps=240, target=32):
    """Thresholds moved by Adam (normalised steps, momentum 0.9, lr 0.02) on lambda * a - m: they
    rise at a fixed rate whenever the L0 term wins, however large lambda is. L0 = K exp(-3 t)."""
    t, m, v, history = -0.35, 0.0, 0.0, []
    for s in range(steps):
        l0 = target * math.exp(-3 * t)
        controller.update(l0)
        g = controller.value * 40 - 0.05
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        t += 0.02 * (m / (1 - 0.9 ** (s + 1))) / (math.sqrt(v / (1 - 0.999 ** (s + 1))) + 1e-12)
        history.append(l0)
    return history


def test_target_l0_controller_does_not_wind_up_under_adam():
    history = _adam_like_plant(train.TargetL0(32, 1e-3))
    assert sum(history[-40:]) / 40 == pytest.approx(32, rel=0.05)
    assert min(history[20:]) > 0.6 * 32
    # The pure integral controller (kp = 0) on the same plant winds up and swings far below.
    assert min(_adam_like_plant(train.TargetL0(32, 1e-3, kp=0.0))[20:]) < 0.5 * 32


def test_target_l0_controller_moves_the_right_way():
    up, down = train.TargetL0(32, 1e-3), train.TargetL0(32, 1e-3)
    assert up.update(64) > 1e-3 and down.update(16) < 1e-3
    up.update(32)                                # at the target the proportional part vanishes
    assert up.value == pytest.approx(math.exp(math.log(1e-3) + 0.05))


def test_target_l0_controller_by_hand_with_trains_gains_and_clamp():
    """error = (L0 - K) / K clipped to [-1, 1]; integral += ki error; lambda = exp(integral + kp error),
    with the ki = 0.05 and kp = 1 that train() uses (it passes neither). An L0 five times K is an error of 1."""
    c, log0 = train.TargetL0(32, 1e-3), math.log(1e-3)
    assert c.update(48) == pytest.approx(math.exp(log0 + 0.05 * 0.5 + 0.5))            # error 0.5
    assert c.update(160) == pytest.approx(math.exp(log0 + 0.05 * 1.5 + 1.0))           # error 4, clipped to 1
    assert c.update(0) == pytest.approx(math.exp(log0 + 0.05 * 0.5 - 1.0))             # error -1
    assert c.state() == {"integral": pytest.approx(log0 + 0.025), "value": c.value}


def test_processes_reads_torchruns_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert train.processes("cpu") == (0, 0, 1, "cpu")                                # one process
    assert train.processes(None) == (0, 0, 1, "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.processes("cpu") == (3, 1, 4, "cpu")                                # a CPU rank keeps the CPU


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_adam_takes_the_recipes_settings_and_the_thresholds_their_own_learning_rate(arch):
    sae = JumpReLUSAE(4, 8) if arch == "jumprelu" else TopKSAE(4, 8, k=2)
    opt = train.make_optimizer(sae, {**train.RECIPES["small"], "lr": 0.01, "betas": (0.5, 0.9), "threshold_lr_scale": 7.0}, "cpu")
    others, thresholds = opt.param_groups
    names = {id(p): n for n, p in sae.named_parameters()}
    assert [names[id(p)] for p in others["params"]] == [n for n, _ in sae.named_parameters() if n != "log_threshold"]
    assert [names[id(p)] for p in thresholds["params"]] == (["log_threshold"] if arch == "jumprelu" else [])
    assert (others["lr_scale"], thresholds["lr_scale"]) == (1.0, 7.0)
    for group in opt.param_groups:
        assert (group["lr"], group["betas"], group["eps"], group["fused"]) == (0.01, (0.5, 0.9), 1e-8, False)


SETTINGS = [  # settings beyond jumprelu, --path auto, a batch of 128, d_sae 64, one process; None: it trains
    (dict(arch="topk", target_l0=1, d_sae=1), None),                      # k = 1 and d_sae = k: the smallest there is
    (dict(arch="topk", target_l0=4, world=2), None), (dict(arch="batchtopk", target_l0=4), None),
    (dict(path="sparse", sparsity="l0", l0_coefficient=1e-3), None), (dict(path="dense", arch="relu", l0_coefficient=1e-3), None),
    (dict(recipe="paper", arch="topk", target_l0=8), None), (dict(recipe="paper", sparsity="tanh", l0_coefficient=1e-3), None),
    (dict(sparsity="target_row", target_l0=8, d_sae=8), None), (dict(l0_coefficient=1e-3, d_sae=1), None),
    (dict(arch="bogus", target_l0=4), "--arch must be one of jumprelu, "),
    (dict(arch="batchtopk", target_l0=4, world=2), "--arch batchtopk ranks the latents of the whole batch"),
    (dict(path="bogus", target_l0=4), "--path must be auto, dense or sparse, not 'bogus'"),
    (dict(path="sparse", arch="topk", target_l0=4), "--path sparse is JumpReLU's; --arch topk trains on the dense path"),
    (dict(path="sparse", sparsity="tanh", l0_coefficient=1e-3), "--sparsity tanh trains on the dense path"),
    (dict(recipe="paper", target_l0=8), "--recipe paper fixes lambda"), (dict(recipe="paper", arch="relu"), "--recipe paper fixes lambda"),
    (dict(), "set the sparsity with --target-l0 K or --l0-coefficient LAMBDA"),
    (dict(arch="relu", sparsity="l0", l0_coefficient=1e-3), "--sparsity is JumpReLU's; drop it for --arch relu"),
    (dict(sparsity="target_batch", l0_coefficient=1e-3), "--sparsity target_batch holds the L0 at --target-l0 K"),
    (dict(arch="topk", target_l0=2.5), "--arch topk needs --target-l0 K, a positive whole number (its k), not 2.5"),
    (dict(arch="topk", target_l0=0), "--arch topk needs --target-l0 K, a positive whole number (its k), not 0"),
    (dict(arch="topk", l0_coefficient=1e-3), "--arch topk needs --target-l0 K"),
    (dict(target_l0=4, batch_size=129, world=2), "--batch-size 129 cannot be split evenly over 2 ranks; pass a multiple of 2"),
    (dict(target_l0=8, d_sae=7), "--d-sae 7 is fewer latents than an L0 of 8 needs"),
]


@pytest.mark.parametrize("settings, refusal", SETTINGS)
def test_settings_that_cannot_train_are_refused_in_one_sentence_and_the_edge_cases_train(settings, refusal):
    given = {"arch": "jumprelu", "path": "auto", "batch_size": 128, "d_sae": 64, **settings}
    world, recipe = given.pop("world", 1), given.pop("recipe", "small")
    hp = {**train.RECIPES[recipe], "recipe": recipe, "target_l0": None, "l0_coefficient": None, **given}
    for key in ("target_l0", "l0_coefficient"):
        given.pop(key, None)
    if refusal is None:
        train.check_settings(hp, given, world)
    else:
        with pytest.raises(ValueError) as info:
            train.check_settings(hp, given, world)
        assert refusal in str(info.value) and "\n" not in str(info.value), str(info.value)


def _wide_acts(folder, d_in=4):
    """A harvested folder of 20,004 training rows (more than open_data's sample of 16,384) and 300 held out."""
    manifest = acts.new_manifest(dict(model="m", gguf_file=None, layer=1, site="resid", context=4, dtype="float32",
                                      heldout_every=5, source={"text": "t"}), "model.layers.1", d_in)
    rng = np.random.default_rng(0)
    for split, sizes in (("train", (12_000, 8_004)), ("heldout", (300,))):
        (folder / split).mkdir(parents=True)
        for rows in sizes:                                           # 3 rows a window of 4 tokens
            acts_ND = (rng.standard_normal((rows, d_in)) * 3 + 1).astype(np.float32)
            acts.append_shard(folder, manifest, split, acts_ND, np.zeros((rows // 3, 4), np.int32))
    return folder


def test_open_data_draws_the_scale_and_both_samples_from_the_seed(tmp_path):
    """The input scale from 16,384 training rows drawn with the seed; the first 4,096 of them for the initialisation and
    a held-out batch, both scaled, in the run's dtype; a batch may take the whole training split."""
    folder = _wide_acts(tmp_path / "acts")
    _, shards, scale, sample_ND, x_eval_BD = train.open_data(folder, 128, 5, "cpu", torch.float64)
    drawn_ND = acts.sample_rows(shards, 16_384, 5)
    assert scale == train.input_scale(drawn_ND) and sample_ND.dtype == x_eval_BD.dtype == torch.float64
    assert torch.equal(sample_ND, drawn_ND[:4096].double() * scale)
    assert torch.equal(x_eval_BD, acts.sample_rows(acts.open_split(folder, "heldout")[1], 128, 5).double() * scale)
    assert train.open_data(folder, 20_004, 5, "cpu")[4].shape == (300, 4)           # a batch of the whole split
    with pytest.raises(ValueError, match="has 20,004 rows, fewer than one batch of 20,005"):
        train.open_data(folder, 20_005, 5, "cpu")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_a_damaged_shard_stops_training_before_it_starts(tmp_path, split):
    """Unless the run is told the shards were checked already (torchrun: one rank a machine reads them)."""
    folder = _wide_acts(tmp_path / "acts")
    path = folder / split / "acts_00000.npy"
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))              # the last value times 4 or a quarter
    with pytest.raises(ValueError, match=f"{split}/acts_00000.npy does not match its sha256"):
        train.open_data(folder, 128, 0, "cpu")
    train.open_data(folder, 128, 0, "cpu", verify=False)


def test_input_scale_makes_mean_squared_norm_one():
    x = torch.randn(1000, 8) * 37 + 5
    s = train.input_scale(x)
    assert (x * s).pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-6)


def _train(acts_dir, out, **kw):
    args = dict(d_sae=64, steps=8, target_l0=4, batch_size=128, log_every=2, checkpoint_every=4, quiet=True, device="cpu")
    return train.train(acts_dir, out, **{**args, **kw})


def _log(folder):
    """The records of folder/log.jsonl."""
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _checkpoint_sae(folder, d_in=32, d_sae=64):
    """The SAE inside a checkpoint: weights in scaled-input space, as training saw them."""
    from safetensors import safe_open
    sae = JumpReLUSAE(d_in, d_sae)
    with safe_open(str(folder / "checkpoint.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
        with torch.no_grad():
            for n, p in sae.named_parameters():
                p.copy_(f.get_tensor(f"param.{n}"))
    sae.bandwidth = state["bandwidth"]
    return sae, state


def test_saved_sae_takes_raw_activations(tiny_acts, tmp_path, capsys):
    record = _train(tiny_acts, tmp_path / "sae")
    assert capsys.readouterr().out == ""                                     # quiet: no record printed, no bar
    for key in ("loss", "mse", "l0", "heldout_l0", "heldout_fvu", "dead_fraction", "l0_coefficient", "lr", "tokens_per_s"):
        assert math.isfinite(record[key]), key
    saved = sae_folder.load(tmp_path / "sae")
    assert (saved.threshold > 0).all()                     # our own training keeps theta > 0
    scaled, state = _checkpoint_sae(tmp_path / "sae")
    assert saved.metadata["input_scale"] == pytest.approx(state["scale"]) and state["scale"] != 1.0
    assert set(state) == {"step", "scale", "bandwidth", "arch", "d_sae", "last_l0", "l0_coefficient", "controller", "recipe",
                          "hp", "seed"}                              # what a reader of the checkpoint finds in it
    assert (state["arch"], state["d_sae"], state["recipe"], state["seed"], state["hp"]["lr"]) == ("jumprelu", 64, "small", 0, 1e-3)
    manifest = json.loads((tiny_acts / "manifest.json").read_text())                  # where it came from, and how
    assert {k: saved.metadata.get(k) for k in ("model", "gguf_file", "layer", "site", "hook", "context")} == \
        {k: manifest[k] for k in ("model", "gguf_file", "layer", "site", "hook", "context")}
    assert (saved.metadata["layer"], saved.metadata["site"], saved.metadata["hook"]) == (1, "resid", "model.layers.1")
    assert {k: saved.metadata[k] for k in ("acts", "recipe", "steps", "tokens", "seed", "lr", "target_l0", "l0_coefficient",
                                           "sparsity")} == {"acts": str(tiny_acts), "recipe": "small", "steps": 8,
                                                            "tokens": 8 * 128, "seed": 0, "lr": 1e-3, "target_l0": 4,
                                                            "l0_coefficient": 5e-3, "sparsity": "target_batch"}
    x_raw = acts.sample_rows(acts.open_split(tiny_acts, "heldout")[1], 200)
    with torch.no_grad():
        torch.testing.assert_close(saved.encode(x_raw), scaled.encode(x_raw * state["scale"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved(x_raw), scaled(x_raw * state["scale"]) / state["scale"], rtol=1e-4, atol=1e-4)
    log = _log(tmp_path / "sae")
    assert [r["step"] for r in log] == [2, 4, 6, 8]


def test_the_last_step_is_checkpointed_whatever_the_cadence(tiny_acts, tmp_path):
    _train(tiny_acts, tmp_path / "sae", steps=6, log_every=4)                # checkpoints at 4, and at 6
    assert _checkpoint_sae(tmp_path / "sae")[1]["step"] == 6
    assert [r["step"] for r in _log(tmp_path / "sae")] == [4, 6]


def _killed_at_step_6(monkeypatch, run):
    """run() dies at step 6, after the checkpoint of step 4, as a killed process would."""
    real_lr_at = train.lr_at

    def dying_lr_at(step, *a, **k):
        if step == 6:
            raise KeyboardInterrupt
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(train, "lr_at", dying_lr_at)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train, "lr_at", real_lr_at)


@pytest.mark.parametrize("extra", [{"dead_window_tokens": 256}, {"sparsity": "l0"},   # pull active; PI controller
                                   {"sparsity": "tanh"}])             # Anthropic's bandwidth, converted again
def test_resume_after_a_kill_ends_with_identical_weights(tiny_acts, tmp_path, monkeypatch, extra):
    _train(tiny_acts, tmp_path / "whole", **extra)
    _killed_at_step_6(monkeypatch, lambda: _train(tiny_acts, tmp_path / "killed", **extra))
    state = _checkpoint_sae(tmp_path / "killed")[1]
    assert state["step"] == 4 and state["l0_coefficient"] == (state["controller"]["value"] if state["controller"] else 5e-3)
    _train(tiny_acts, tmp_path / "killed", resume=True, **extra)
    with pytest.raises(ValueError, match="already at step 8"):
        _train(tiny_acts, tmp_path / "killed", resume=True, **extra)
    whole, killed = sae_folder.load(tmp_path / "whole"), sae_folder.load(tmp_path / "killed")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(whole, name), getattr(killed, name)), name


def test_resume_with_just_acts_and_out_carries_the_run_on_to_its_own_end(tiny_acts, tmp_path, monkeypatch, capsys):
    """A run killed by Ctrl-C after its step-4 checkpoint says in one line what is kept and how to go
    on (exit 130); that command, with none of the settings, ends where the uninterrupted run does."""
    settings = ["--d-sae", "48", "--steps", "8", "--target-l0", "4", "--batch-size", "128", "--log-every", "2",
                "--checkpoint-every", "4", "--device", "cpu", "--lr", "0.002", "--seed", "5"]
    train.main(["--acts", str(tiny_acts), "--out", str(tmp_path / "whole"), *settings])
    real_lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: real_lr_at(step, *a) if step < 6 else _raise(KeyboardInterrupt))
    with pytest.raises(SystemExit) as info:
        train.main(["--acts", str(tiny_acts), "--out", str(tmp_path / "killed"), *settings])
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    ckpt = tmp_path / "killed" / "checkpoint.safetensors"
    carry_on = f"python train.py --acts {tiny_acts} --out {tmp_path / 'killed'} --resume"
    assert info.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: {ckpt} (step 4) is kept; carry on with: {carry_on}")
    train.main(carry_on.split()[2:])
    printed = capsys.readouterr().out
    assert f"resuming {tmp_path / 'killed'} at step 4 of 8" in printed and "step 8: loss" in printed
    whole, killed = sae_folder.load(tmp_path / "whole"), sae_folder.load(tmp_path / "killed")
    assert killed.d_sae == 48 and all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                                          killed.state_dict().values()))
    assert _log(tmp_path / "killed") == [{**r, **{k: _log(tmp_path / "killed")[i][k] for k in SPEED}}
                                         for i, r in enumerate(_log(tmp_path / "whole"))]
    train.main(carry_on.split()[2:])                                  # nothing left to do: said, not an error
    assert "is already trained to step 8; pass a larger --steps to train on." in capsys.readouterr().out


def test_a_checkpoint_made_before_a_setting_existed_resumes_with_the_recipes_value(tiny_acts, tmp_path, capsys):
    """A checkpoint keeps the settings of its day: one made before --matryoshka existed carries on as
    the plain run it was, to a larger --steps."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "sae"
    settings = ["--acts", str(tiny_acts), "--out", str(out), "--d-sae", "48", "--target-l0", "4", "--batch-size", "128",
                "--device", "cpu"]
    train.main([*settings, "--steps", "4"])
    ckpt = out / "checkpoint.safetensors"
    state, _ = train.read_checkpoint(ckpt, tensors=False)
    del state["hp"]["matryoshka"]
    save_file(load_file(ckpt), ckpt, metadata={"state": json.dumps(state)})
    train.main([*settings, "--steps", "6", "--resume"])
    assert f"resuming {out} at step 4 of 6" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["steps"] == 6


def _raise(error):
    raise error


SPEED = ("tokens_per_s", "flops_per_s", "vs_ceiling")     # a log's figures of the clock, not of the run


@pytest.mark.parametrize("given, said", [(["--d-sae", "32"], "--d-sae 32 contradicts the 48"),
                                         (["--target-l0", "5"], "--target-l0 5.0 contradicts the 4.0"),
                                         (["--arch", "topk"], "--arch topk contradicts the jumprelu"),
                                         (["--recipe", "paper"], "--recipe paper contradicts the small")])
def test_a_resume_refuses_a_setting_that_contradicts_its_checkpoint_naming_both_values(tiny_acts, tmp_path, capsys,
                                                                                       given, said):
    """Only --steps and how to run may change on --resume: anything else would be another run."""
    out = tmp_path / "sae"
    train.main(["--acts", str(tiny_acts), "--out", str(out), "--d-sae", "48", "--steps", "4", "--target-l0", "4",
                "--batch-size", "128", "--checkpoint-every", "2", "--device", "cpu"])
    with pytest.raises(SystemExit) as info:
        train.main(["--acts", str(tiny_acts), "--out", str(out), "--resume", *given])
    assert str(info.value) == (f"error: {said} that {out / 'checkpoint.safetensors'} was made with; leave it out to "
                               "carry on that run, or pass another --out.")
    train.main(["--acts", str(tiny_acts), "--out", str(out), "--resume", "--steps", "6", "--device", "cpu",
                "--log-every", "3", "--d-sae", "48"])                 # a longer run, as it was made: it trains on
    assert f"resuming {out} at step 4 of 6" in capsys.readouterr().out and _log(out)[-1]["step"] == 6


@pytest.mark.parametrize("l0, warned", [(25.6, "the L0 ended at 25.6, 28% above --target-l0 20"),
                                        (14.0, "the L0 ended at 14.0, 30% below --target-l0 20"),
                                        (21.9, None), (18.1, None)])
def test_the_last_line_warns_of_an_l0_more_than_10_percent_from_the_target(l0, warned):
    line = train.last_line("runs/sae", {"heldout_l0": l0, "heldout_fvu": 0.1, "dead_fraction": 0.0},
                           {"target_l0": 20, "batch_size": 2048})
    assert line.splitlines()[0].startswith(f"wrote the SAE to runs/sae: L0 {l0:.1f}, FVU 0.100 on a held-out sample of "
                                           "2,048 tokens (evaluate.py measures the whole split)")
    assert line.splitlines()[1:] == ([f"warning: {warned}; train longer (--steps) for it to settle."] if warned else [])
    assert "\n" not in train.last_line("runs/sae", {"heldout_l0": 40, "heldout_fvu": 0.1, "dead_fraction": 0.0},
                                       {"target_l0": None, "batch_size": 2048})   # a fixed lambda has no target


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_checkpoint_restores_a_fused_adam_as_torchs_own_load_state_dict(tmp_path, device):
    """A checkpoint (CPU tensors) loaded into a fused Adam leaves every state tensor on the device,
    in the dtype and with the strides that torch's load_state_dict gives from the live optimiser:
    fused Adam on CUDA refuses a `step` left on the CPU (pytorch issue 103256), and a row-major
    moment of the column-major W_enc made fused Adam update the wrong entries. "meta" stands in for
    a GPU here: a device other than the file's."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(8, 16)
    opt = train.make_optimizer(sae, train.RECIPES["small"], "cuda")              # fused=True, as on a GPU
    for _ in range(2):
        sae.loss(torch.randn(32, 8), 1e-3)["loss"].backward()
        opt.step()
        opt.zero_grad()
    train.save_checkpoint(tmp_path / "c.safetensors", sae, opt, torch.zeros(16), {"step": 2})

    def fused():
        sae = JumpReLUSAE(8, 16).to(device)
        return sae, train.make_optimizer(sae, train.RECIPES["small"], "cuda")      # fused=True, on any device

    (ours_sae, ours), (theirs_sae, theirs) = fused(), fused()
    train.load_checkpoint(tmp_path / "c.safetensors", ours_sae, ours, torch.zeros(16, device=device))
    theirs.load_state_dict(opt.state_dict())
    assert all(group["fused"] for group in ours.param_groups + theirs.param_groups)
    for (name, p), q in zip(ours_sae.named_parameters(), theirs_sae.parameters()):
        assert ours.state[p].keys() == theirs.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key, want in theirs.state[q].items():
            got = ours.state[p][key]
            assert (got.device, got.dtype, got.stride()) == (want.device, want.dtype, want.stride()), (name, key)
            assert device == "meta" or torch.equal(got.cpu(), want.cpu()), (name, key)
    if device != "meta":                        # and the next step is the one the live optimiser takes
        theirs_sae.load_state_dict(sae.state_dict())
        x = torch.randn(32, 8, device=device)
        for s, o in ((ours_sae, ours), (theirs_sae, theirs)):
            s.loss(x, 1e-3)["loss"].backward()
            o.step()
        for (name, p), q in zip(ours_sae.named_parameters(), theirs_sae.parameters()):
            assert torch.equal(p, q), name


def _stepped(sae, steps=2):
    """sae and its optimiser (train's) after `steps` Adam steps, so that every moment is set."""
    opt = train.make_optimizer(sae, train.RECIPES["small"], "cpu")
    x = torch.randn(32, sae.d_in, dtype=sae.W_enc.dtype)
    for _ in range(steps):
        sae.loss(x, 1e-3)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return sae, opt


def test_checkpoint_keeps_float64_adam_moments_exactly(tmp_path):
    """--dtype float64 (checks against a reference): the moments come back bit for bit, not through float32."""
    torch.manual_seed(0)
    sae, opt = _stepped(JumpReLUSAE(8, 16, dtype=torch.float64))
    train.save_checkpoint(tmp_path / "c.safetensors", sae, opt, torch.zeros(16, dtype=torch.long), {"step": 2})
    again, opt_again = _stepped(JumpReLUSAE(8, 16, dtype=torch.float64), steps=0)
    train.load_checkpoint(tmp_path / "c.safetensors", again, opt_again, torch.zeros(16, dtype=torch.long))
    for (name, p), q in zip(sae.named_parameters(), again.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = opt_again.state[q][key], opt.state[p][key]
            assert got.dtype == torch.float64 and torch.equal(got, want), (name, key)


def _rewrite_checkpoint(path, tensors=lambda t: t, state=lambda s: s):
    """The checkpoint at `path` with its tensors and JSON state edited."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), "pt") as f:
        old_state = json.loads(f.metadata()["state"])
    save_file(tensors(load_file(str(path))), str(path), metadata={"state": json.dumps(state(old_state))})


def _without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


DAMAGED, ANOTHER = "is damaged", r"holds another SAE \({}\); resume with the --acts and settings it was made with"
DAMAGE = {  # what a damaged file, or one of another SAE, looks like to load_checkpoint, and what it says
    "no step": (dict(state=_without("step")), DAMAGED),
    "a step that is no whole number": (dict(state=lambda s: {**s, "step": "4"}), DAMAGED),
    "no fired_at": (dict(tensors=_without("fired_at")), ANOTHER.format(r"fired_at is missing, not \[16\]")),
    "fired_at of another width": (dict(tensors=lambda t: {**t, "fired_at": t["fired_at"][:8]}),
                                  ANOTHER.format(r"fired_at is \[8\], not \[16\]")),
    "b_enc of another width, with no moments to give it away": (dict(tensors=lambda t: {
        **{k: v for k, v in t.items() if not k.startswith("adam.b_enc.")}, "param.b_enc": t["param.b_enc"][:1]}),
        ANOTHER.format(r"param.b_enc is \[1\], not \[16\]")),
    "no BatchTopK threshold (a TopK checkpoint)": (dict(tensors=_without("buffer.threshold")),
                                                   ANOTHER.format(r"buffer.threshold is missing, not \[\]")),
    "no Adam moment of W_enc's shape": (dict(tensors=lambda t: {**t, "adam.W_enc.exp_avg": t["adam.W_enc.exp_avg"][:1]}),
                                        ANOTHER.format("its Adam moments are of other shapes")),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_sentence_and_nothing_is_loaded(tmp_path, damage):
    torch.manual_seed(0)
    sae, opt = _stepped(BatchTopKSAE(8, 16, k=2))
    train.save_checkpoint(tmp_path / "c.safetensors", sae, opt, torch.ones(16, dtype=torch.long), {"step": 4})
    _rewrite_checkpoint(tmp_path / "c.safetensors", **DAMAGE[damage][0])
    torch.manual_seed(1)
    fresh, opt = _stepped(BatchTopKSAE(8, 16, k=2), steps=0)
    before, fired_at = {k: v.clone() for k, v in fresh.state_dict().items()}, torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match=DAMAGE[damage][1]) as info:
        train.load_checkpoint(tmp_path / "c.safetensors", fresh, opt, fired_at)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()) and not fired_at.any() and not opt.state


def test_resume_restores_the_runs_bandwidth_and_controller_and_reads_an_older_checkpoint_as_jumprelu(tmp_path):
    """A checkpoint written before the baselines came (9d2f0d4) names no arch nor d_sae: it is a JumpReLU's.
    The bandwidth is the checkpoint's, whatever the resumed run's own start gave."""
    ckpt = tmp_path / "checkpoint.safetensors"
    sae, opt = _stepped(JumpReLUSAE(8, 16, bandwidth=0.001))
    old = {"step": 3, "scale": 2.5, "bandwidth": 0.0123, "controller": {"integral": -5.0, "value": 0.02}}
    train.save_checkpoint(ckpt, sae, opt, torch.zeros(16, dtype=torch.long), old)
    sae, opt = _stepped(JumpReLUSAE(8, 16, bandwidth=0.001), steps=0)
    controller = train.TargetL0(4)
    state = train.resume_from(ckpt, sae, opt, torch.zeros(16, dtype=torch.long), controller,
                              {"arch": "jumprelu", "d_sae": 16, "steps": 10})
    assert state == old and sae.bandwidth == 0.0123 and controller.state() == old["controller"]
    topk = TopKSAE(8, 16, k=2)
    with pytest.raises(ValueError, match="holds a jumprelu SAE"):
        train.resume_from(ckpt, topk, train.make_optimizer(topk, train.RECIPES["small"], "cpu"), torch.zeros(16, dtype=torch.long),
                          None, {"arch": "topk", "d_sae": 16, "steps": 10})


def test_resume_drops_the_log_after_the_checkpoint_and_a_line_a_kill_cut_short(tmp_path):
    """A record whose newline the kill cut off is dropped too: kept, the next record would be glued to it."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 3}')
    train.start_log(log, resume=True, step=4)
    assert log.read_text() == '{"step": 2}\n{"step": 4}\n'
    train.start_log(log, resume=False, step=0)
    assert not log.exists()
    train.start_log(tmp_path / "early" / "log.jsonl", resume=True, step=4)     # killed before its first record
    assert (tmp_path / "early").is_dir() and not (tmp_path / "early" / "log.jsonl").exists()


def test_a_failure_says_whether_there_is_a_checkpoint_to_resume_from(tmp_path):
    assert train.last_good(tmp_path / "checkpoint.safetensors") == "no checkpoint was written yet"
    (tmp_path / "checkpoint.safetensors").write_bytes(b"")
    assert train.last_good(tmp_path / "checkpoint.safetensors") == f"the last good checkpoint is {tmp_path}/checkpoint.safetensors"


def test_paper_recipe_runs_with_a_fixed_coefficient(tiny_acts, tmp_path):
    record = _train(tiny_acts, tmp_path / "paper", recipe="paper", target_l0=None, l0_coefficient=1e-3)
    assert record["l0_coefficient"] == pytest.approx(1e-3 * 7 / 10_000)   # lambda warm-up: step 7 of 10,000
    saved = sae_folder.load(tmp_path / "paper")
    assert saved.bandwidth == 0.001 and saved.metadata["recipe"] == "paper"


# Every --recipe paper command line with each --sparsity, and --target-l0 K, --l0-coefficient LAMBDA or
# neither: what it means (the call train() receives), or the sentence that refuses it.
PAPER_ONLY = "--recipe paper fixes lambda and warms it up over 10,000 steps: pass --l0-coefficient LAMBDA"
PAPER_CASES = [
    ([], None, PAPER_ONLY), (["--target-l0", "8"], None, PAPER_ONLY),
    (["--l0-coefficient", "1e-3"], {"l0_coefficient": 1e-3, "sparsity": "l0"}, None),            # the paper
    (["--sparsity", "l0"], None, PAPER_ONLY), (["--sparsity", "l0", "--target-l0", "8"], None, PAPER_ONLY),
    (["--sparsity", "l0", "--l0-coefficient", "1e-3"], {"l0_coefficient": 1e-3, "sparsity": "l0"}, None),   # the same
    (["--sparsity", "target_batch"], None, PAPER_ONLY), (["--sparsity", "target_row"], None, PAPER_ONLY),
    (["--sparsity", "target_batch", "--target-l0", "8"], None, PAPER_ONLY),
    (["--sparsity", "target_row", "--target-l0", "8"], None, PAPER_ONLY),       # once a TypeError
    (["--sparsity", "target_batch", "--l0-coefficient", "1e-3"], None, "--sparsity target_batch holds the L0 at --target-l0 K"),
    (["--sparsity", "target_row", "--l0-coefficient", "1e-3"], None, "--sparsity target_row holds the L0 at --target-l0 K"),
    (["--sparsity", "tanh"], None, PAPER_ONLY), (["--sparsity", "tanh", "--target-l0", "8"], None, PAPER_ONLY),
    (["--sparsity", "tanh", "--l0-coefficient", "1e-3"], {"l0_coefficient": 1e-3, "sparsity": "tanh"}, None),  # Anthropic's loss
    (["--arch", "topk", "--target-l0", "8"], {"target_l0": 8}, None),            # the paper's schedule, k = 8
    (["--arch", "topk"], None, "set the sparsity with --target-l0 K"),
    (["--arch", "topk", "--l0-coefficient", "1e-3"], None, "--arch topk needs --target-l0 K"),
    (["--arch", "relu", "--l0-coefficient", "1e-3"], {"l0_coefficient": 1e-3, "sparsity": "l0"}, None),   # its L1 coefficient
    (["--arch", "gated", "--target-l0", "8"], None, PAPER_ONLY),
    (["--arch", "relu", "--sparsity", "tanh", "--l0-coefficient", "1e-3"], None, "--sparsity is JumpReLU's"),
]


@pytest.mark.parametrize("flags, meaning, refusal", PAPER_CASES, ids=[" ".join(c[0]) or "none" for c in PAPER_CASES])
def test_every_paper_recipe_combination_runs_with_a_meaning_or_is_refused_in_one_sentence(tiny_acts, tmp_path,
                                                                                          monkeypatch, flags, meaning, refusal):
    calls = []
    monkeypatch.setattr(train, "train", lambda acts_dir, out, hp, **k: calls.append(hp) or {
        "heldout_l0": 1, "heldout_fvu": 1, "dead_fraction": 0})
    argv = ["--acts", str(tiny_acts), "--out", str(tmp_path / "sae"), "--recipe", "paper", "--d-sae", "64", *flags]
    if refusal:
        with pytest.raises(SystemExit) as exit_:
            train.main(argv)
        message = exit_.value.code
        assert message.startswith("error: ") and refusal in message and "\n" not in message and not calls, message
    else:
        train.main(argv)
        assert len(calls) == 1 and calls[0]["recipe"] == "paper"
        assert {k: calls[0].get(k) for k in meaning} == meaning


@pytest.mark.parametrize("kw", [dict(sparsity="tanh", l0_coefficient=1e-3, target_l0=None), dict(arch="topk")])
def test_paper_recipe_runs_anthropics_loss_and_topk(tiny_acts, tmp_path, kw):
    """Two of the runs above, trained: the paper's schedule with Anthropic's loss (the bandwidth theirs,
    2.0 on inputs scaled to E||x|| = sqrt(d_in)) and with TopK's k (no lambda to warm up)."""
    record = _train(tiny_acts, tmp_path / "paper", recipe="paper", **kw)
    assert math.isfinite(record["heldout_fvu"])
    sae = formats.load_sae(tmp_path / "paper")
    if kw.get("sparsity") == "tanh":
        _, shards = acts.open_split(tiny_acts, "train")
        x = acts.sample_rows(shards, 16_384, 0)
        x = x * train.input_scale(x)
        assert sae.bandwidth == pytest.approx(2.0 * x.norm(dim=1).mean().item() / math.sqrt(32), rel=1e-5)
        assert record["l0_coefficient"] == pytest.approx(1e-3 * 7 / 10_000)        # warmed up: step 7 of 10,000
        assert sae.metadata["sparsity"] == "tanh"


def test_anthropics_jumprelu_trains_free_decoder_norms_and_saves_exports_and_converts_as_any_jumprelu(tiny_acts, tmp_path):
    """Under --sparsity tanh the decoder rows start at unit norm and move (the paper's JumpReLU keeps
    them at 1); the saved SAE is a plain JumpReLUSAE whose rows are those norms over the input scale,
    its ONNX export matches PyTorch, and it comes back from a SAELens folder computing the same."""
    import export
    _train(tiny_acts, tmp_path / "jumprelu")
    _train(tiny_acts, tmp_path / "tanh", sparsity="tanh")
    paper_norms = _checkpoint_sae(tmp_path / "jumprelu")[0].W_dec.norm(dim=1)
    trained, state = _checkpoint_sae(tmp_path / "tanh")
    norms = trained.W_dec.norm(dim=1)
    torch.testing.assert_close(paper_norms, torch.ones(64), rtol=0, atol=1e-6)
    assert (norms - 1).abs().max() > 5e-4 and norms.std() > 1e-5, norms       # moved (by up to 2e-3), not all alike
    saved = sae_folder.load(tmp_path / "tanh")
    assert type(saved) is JumpReLUSAE and saved.bandwidth == state["bandwidth"]
    torch.testing.assert_close(saved.W_dec.norm(dim=1), norms / state["scale"])
    module = export.export(saved, tmp_path / "sae.onnx", what="sae")
    ok, reports, _, _ = export.verify(tmp_path / "sae.onnx", module, saved, acts_dir=tiny_acts)
    assert ok, reports
    formats.save_saelens(saved, tmp_path / "saelens")
    back = formats.load_saelens(tmp_path / "saelens")
    x = acts.sample_rows(acts.open_split(tiny_acts, "heldout")[1], 200)
    with torch.no_grad():
        assert torch.equal(back.encode(x), saved.encode(x)) and torch.equal(back(x), saved(x))


@pytest.mark.parametrize("given", [[], ["--bandwidth", "0.05"]])
def test_a_given_bandwidth_trains_and_is_recorded_as_given_under_tanh(tiny_acts, tmp_path, given):
    """--bandwidth is in our units (inputs scaled to E||x||^2 = 1) under every sparsity: with --sparsity
    tanh, 0.05 trains with 0.05 and config.json and the checkpoint say 0.05. Only the recipe's own,
    Anthropic's 2.0 on inputs of norm sqrt(d_in), is converted, to 2.0 E||x|| / sqrt(d_in)."""
    train.main(["--acts", str(tiny_acts), "--out", str(tmp_path / "sae"), "--sparsity", "tanh", "--l0-coefficient", "1e-3",
                "--steps", "2", "--d-sae", "64", "--batch-size", "128", "--device", "cpu", *given])
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    trained, state = _checkpoint_sae(tmp_path / "sae")
    x = acts.sample_rows(acts.open_split(tiny_acts, "train")[1], 16_384, 0)
    x = x * train.input_scale(x)
    want = 0.05 if given else 2.0 * x.norm(dim=1).mean().item() / math.sqrt(32)
    assert config["bandwidth"] == state["bandwidth"] == pytest.approx(want, rel=1e-6)
    assert state["hp"]["bandwidth"] == (0.05 if given else anthropic.THEIR_BANDWIDTH)      # what --resume reads


def test_no_latent_is_dead_before_it_has_had_the_window_to_fire():
    """fired_at starts at 0: with a window of 3 steps, a latent that never fires is dead from step 3
    on (after 3 batches), not from step 0; one that fired at step s is dead again from step s + 4."""
    seen = []

    def loss_fn(x_BD, coefficient, dead_F):
        assert not torch.is_autocast_enabled("cpu")                # bf16 autocast only when asked for
        seen.append(dead_F.clone())
        fired = torch.tensor([len(seen) == 2, False])            # latent 0 fires at step 1 only
        return {"loss": sae.W_enc.sum() * 0, "l0": torch.tensor(0.0), "fired": fired}

    sae = JumpReLUSAE(2, 2)
    opt, fired_at = torch.optim.Adam(sae.parameters()), torch.zeros(2, dtype=torch.long)
    for step_ in range(7):
        train.train_step(sae, opt, loss_fn, torch.zeros(1, 2), 0.0, fired_at, step_, dead_steps=3)
    assert [d.tolist() for d in seen] == [[False, False]] * 3 + [[False, True]] * 2 + [[True, True]] * 2


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_training_starts_with_no_latent_dead(tiny_acts, tmp_path, monkeypatch, arch):
    """train() starts every latent's window at step 0 (fired_at once started at -1, so at step 0
    every latent was dead); the pull's window for JumpReLU, AuxK's (dead_steps) for TopK."""
    seen, real = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: seen.append((a[5].clone(), a[6], k["dead_steps"])) or real(*a, **k))
    _train(tiny_acts, tmp_path / "sae", arch=arch, steps=3, dead_window_tokens=300)      # 2 whole batches of 128
    fired_at, step_, dead_steps = seen[0]
    assert step_ == 0 and not (fired_at <= step_ - dead_steps).any()
    assert dead_steps == (1 if arch == "topk" else 2)                       # an eighth of 3 steps, at least 1


def test_a_batch_above_the_training_split_is_refused_in_one_sentence(tiny_acts, tmp_path):
    rows = json.loads((tiny_acts / "manifest.json").read_text())["splits"]["train"]["rows"]
    with pytest.raises(ValueError, match=f"has {rows:,} rows, fewer than one batch of {rows + 1:,}"):
        _train(tiny_acts, tmp_path / "sae", batch_size=rows + 1)


def test_auxks_dead_window_is_gaos_ten_million_tokens_or_an_eighth_of_the_run():
    def dead_steps(arch, steps, batch_size):
        return train.dead_steps({**train.RECIPES["small"], "arch": arch, "steps": steps, "batch_size": batch_size})
    assert dead_steps("topk", 250, 2048) == 31                        # 512k tokens: 31 batches, 63k tokens
    assert dead_steps("batchtopk", 2_000_000, 4096) == 10_000_000 // 4096  # billions of tokens: Gao et al.'s 10M
    assert dead_steps("topk", 4, 128) == 1
    assert dead_steps("jumprelu", 4, 128) == dead_steps("relu", 250, 128) == 2**15 // 128    # dead_window_tokens


def test_sparsity_must_be_given(tiny_acts, tmp_path):
    with pytest.raises(ValueError, match="--target-l0 K or --l0-coefficient"):
        _train(tiny_acts, tmp_path / "x", target_l0=None)


@pytest.mark.parametrize("arch", ["relu", "gated", "topk", "batchtopk"])
def test_every_baseline_trains_resumes_and_loads(tiny_acts, tmp_path, arch):
    import evaluate
    record = _train(tiny_acts, tmp_path / "whole", arch=arch, steps=12, lr_warmup_steps=2)
    sae = formats.load_sae(tmp_path / "whole")
    assert sae.architecture == arch and sae.metadata["target_l0"] == 4 and sae.metadata["input_scale"] > 0
    manifest = acts.read_manifest(tiny_acts)                 # the harvest's windows, for SAELens's evaluations
    assert all(sae.metadata[k] == manifest[k] for k in ("context", "bos", "separator")) and manifest["separator"] is not None
    assert sae.metadata["sparsity"] is None and (sae.metadata["l0_coefficient"] is None) == (arch in train.TOPK)
    _, heldout = acts.open_split(tiny_acts, "heldout")
    metrics = evaluate.activation_metrics(sae, heldout)
    assert metrics["fvu"] < 1.0 and metrics["l0"] > 0                     # it learned something
    if arch == "topk":
        assert metrics["l0"] <= 4 and record["heldout_l0"] <= 4
    if arch == "batchtopk":                 # set from the trained SAE; the running estimate only logged
        assert float(sae.threshold) == pytest.approx(record["threshold"]) and record["threshold"] > 0
        assert record["threshold_running"] > 0 and record["threshold"] != record["threshold_running"]
        log = _log(tmp_path / "whole")
        assert log[-1]["threshold"] == record["threshold"] and log[-1]["heldout_l0"] == record["heldout_l0"]
        assert set(log[-1]) == set(log[-2]) | {"threshold", "record"} and log[-1]["record"] == "calibration"
    # A run killed after its step-8 checkpoint and resumed ends identical (buffers included).
    real_lr_at = train.lr_at

    def dying_lr_at(step, *a, **k):
        if step == 10:
            raise KeyboardInterrupt
        return real_lr_at(step, *a, **k)
    train.lr_at = dying_lr_at
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(tiny_acts, tmp_path / "killed", arch=arch, steps=12, lr_warmup_steps=2)
    finally:
        train.lr_at = real_lr_at
    _train(tiny_acts, tmp_path / "killed", arch=arch, steps=12, lr_warmup_steps=2, resume=True)
    killed = formats.load_sae(tmp_path / "killed")
    for (name, a), b in zip(sae.state_dict().items(), killed.state_dict().values()):
        assert torch.equal(a, b), name


def test_relu_controller_moves_the_l1_coefficient_towards_the_target(tiny_acts, tmp_path):
    low = _train(tiny_acts, tmp_path / "low", arch="relu", steps=60, target_l0=2)
    high = _train(tiny_acts, tmp_path / "high", arch="relu", steps=60, target_l0=30)
    assert low["l0_coefficient"] > high["l0_coefficient"] and low["heldout_l0"] < high["heldout_l0"]


def test_sweep_from_the_command_line_writes_one_folder_per_sparsity(tiny_acts, tmp_path, capsys):
    train.main(["--acts", str(tiny_acts), "--out", str(tmp_path / "sweep"), "--arch", "topk", "--target-l0", "2", "5",
                "--d-sae", "64", "--steps", "4", "--batch-size", "128", "--device", "cpu"])
    for k in (2, 5):
        sae = formats.load_sae(tmp_path / "sweep" / f"topk_l0_{k}")
        assert sae.k == k
    printed, bar = capsys.readouterr()
    assert printed.count("wrote the SAE to") == 2 and printed.count("step 4: loss") == 2      # the last step's record
    assert bar.count("| 4/4 [") >= 2                                                           # a bar to --steps, each run
    with pytest.raises(SystemExit, match="needs --target-l0 K, a positive whole number"):
        train.main(["--acts", str(tiny_acts), "--out", str(tmp_path / "x"), "--arch", "topk", "--target-l0", "2.5"])


def _main(monkeypatch, argv, world=None, rank=None):
    """train.main(argv) with train() recorded, not run: the (acts, out, settings and keywords) of each call."""
    for name, value in (("WORLD_SIZE", world), ("RANK", rank)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(train, "train", lambda acts_dir, out, hp, **k: calls.append((acts_dir, out, {**hp, **k})) or {
        "heldout_l0": 1, "heldout_fvu": 1, "dead_fraction": 0})
    train.main(argv)
    return calls


def test_main_passes_every_option_on_to_train(tiny_acts, tmp_path, monkeypatch):
    """Each flag reaches train() as itself; an odd --batch-size and BatchTopK are fine in one process."""
    out = str(tmp_path / "sae")
    calls = _main(monkeypatch, ["--acts", str(tiny_acts), "--out", out, "--d-sae", "64", "--steps", "7", "--seed", "3",
                                "--log-every", "5", "--checkpoint-every", "6", "--resume", "--device", "cpu", "--path",
                                "dense", "--compile", "--lr", "0.01", "--batch-size", "101",
                                "--bandwidth", "0.05", "--threshold-lr-scale", "3", "--lr-warmup-steps", "2",
                                "--l0-warmup-steps", "4", "--lr-decay-fraction", "0.5", "--sparsity", "l0",
                                "--target-l0", "8"])
    given = dict(arch="jumprelu", d_sae=64, steps=7, recipe="small", seed=3, log_every=5, checkpoint_every=6, resume=True,
                 device="cpu", path="dense", compile=True, target_l0=8, lr=0.01, batch_size=101, bandwidth=0.05,
                 threshold_lr_scale=3, sparsity="l0", lr_warmup_steps=2, l0_warmup_steps=4, lr_decay_fraction=0.5)
    (acts_dir, out_, k), = calls
    assert (acts_dir, out_) == (str(tiny_acts), out) and {key: k[key] for key in given} == given
    (_, _, k), = _main(monkeypatch, ["--acts", str(tiny_acts), "--out", out])          # the defaults
    assert (k["target_l0"], k["d_sae"], k["resume"], k["compile"]) == (32, 8 * 32, False, None)
    assert (k["steps"], k["seed"], k["log_every"], k["checkpoint_every"], k["device"], k["path"]) == (600, 0, 25, 100, None, "auto")
    assert {key: k[key] for key in train.RECIPES["small"] if key != "d_sae"} == \
        {key: v for key, v in train.RECIPES["small"].items() if key != "d_sae"}
    assert _main(monkeypatch, ["--acts", str(tiny_acts), "--out", out, "--arch", "batchtopk", "--target-l0", "4",
                               "--batch-size", "101"])[0][1] == out


def test_help_lists_every_setting_with_both_recipes_values(capsys):
    """--help comes from SETTINGS: each setting with a command-line option under its flag, the others
    in the list of what the recipe alone sets, each with its value in both recipes where they differ."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, s in train.SETTINGS.items():
        assert (f"--{name.replace('_', '-')}" if s.option else f"{name}: {s.help}") in shown, name
        if s.paper != s.small:
            assert f"paper {s.paper}, small {s.small}" in shown, name


def test_train_defaults_are_the_command_lines(tiny_acts, tmp_path, monkeypatch):
    """import train; train.train(acts, out, target_l0=32) in a notebook is `python train.py --acts ACTS --out OUT`."""
    defaults = {name: p.default for name, p in inspect.signature(train.train).parameters.items() if p.default is not p.empty}
    (_, _, called), = _main(monkeypatch, ["--acts", str(tiny_acts), "--out", str(tmp_path / "sae")])
    assert {k: v for k, v in called.items() if k != "resume"} == train.settings(tiny_acts, target_l0=32)
    assert defaults["quiet"] is False and defaults["resume"] is called["resume"] is False   # main passes no quiet: it prints


@pytest.mark.parametrize("argv, rank, headers", [(["--l0-coefficient", "0.001", "2e-3"], None, 2),
                                                  (["--l0-coefficient", "0.001", "2e-3"], "1", 0),
                                                  (["--l0-coefficient", "0.001"], None, 0)])
def test_a_sweep_names_each_run_and_rank_0_alone_prints(tiny_acts, tmp_path, monkeypatch, capsys, argv, rank, headers):
    calls = _main(monkeypatch, ["--acts", str(tiny_acts), "--out", str(tmp_path / "sweep"), *argv], rank=rank)
    values = [float(v) for v in argv[1:]]
    outs = [str(tmp_path / "sweep" / f"jumprelu_lambda_{v:g}") for v in values] if len(values) > 1 else [str(tmp_path / "sweep")]
    assert [(out, k["l0_coefficient"]) for _, out, k in calls] == list(zip(outs, values))
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("== ")] == [f"== {out}" for out in outs][:headers]
    assert printed.count("wrote the SAE to") == (0 if rank else len(values))


@pytest.mark.parametrize("argv, world, refusal", [
    (["--d-sae", "64", "--target-l0", "4", "100"], None, "--d-sae 64 is fewer latents than an L0 of 100 needs"),
    (["--batch-size", "128"], "3", "--batch-size 128 cannot be split evenly over 3 ranks"),
    (["--arch", "batchtopk", "--target-l0", "4"], "2", "--arch batchtopk ranks the latents of the whole batch")])
def test_main_checks_every_run_of_a_sweep_before_the_first_starts(tiny_acts, tmp_path, monkeypatch, argv, world, refusal):
    with pytest.raises(SystemExit) as info:
        _main(monkeypatch, ["--acts", str(tiny_acts), "--out", str(tmp_path / "sae"), *argv], world=world)
    assert str(info.value).startswith("error: ") and refusal in str(info.value)
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("flag", [["--bandwidth", "0.1"], ["--threshold-lr-scale", "3"]])
def test_jumprelus_own_flags_are_refused_for_a_baseline(tiny_acts, tmp_path, monkeypatch, flag):
    with pytest.raises(SystemExit, match=f"^error: {flag[0]} is JumpReLU's; drop it for --arch relu"):
        _main(monkeypatch, ["--acts", str(tiny_acts), "--out", str(tmp_path / "sae"), "--arch", "relu", *flag])


# --- The log ----------------------------------------------------------------------------------------


def test_fvu_by_hand():
    """docs/maths.md section 5: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean over rows: 5 / 4."""
    x_BD, x_hat_BD = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    assert train.fvu(x_BD, x_hat_BD) == 1.25


def _clock(monkeypatch, *times):
    """train's time.perf_counter returns `times`, one per call, then the last of them."""
    ticks = itertools.chain(times, itertools.repeat(times[-1]))
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_matmul_ceiling_is_the_flop_rate_of_one_B_by_d_in_by_d_sae_matmul(monkeypatch):
    made, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **k: made.append((shape, k)) or randn(*shape, **k))
    _clock(monkeypatch, 10.0, 12.0)                                   # 2 s for the timed repeats
    assert train.matmul_ceiling("cpu", 6, 4, 5, torch.float64, repeats=3) == 3 * 2 * 6 * 4 * 5 / 2.0
    assert made == [((6, 4), dict(device="cpu", dtype=torch.float64)), ((4, 5), dict(device="cpu", dtype=torch.float64))]


@pytest.mark.parametrize("arch, autocast", [("jumprelu", False), ("batchtopk", True)])
def test_a_log_record_by_hand(tmp_path, monkeypatch, arch, autocast):
    """tokens/s from the clock since the last record; FLOP/s 10 d_in d_sae a token (the step's five matmuls);
    vs_ceiling: over the ceiling of one rank's slice in the step's dtype (bf16 under autocast); dead: no firing
    in the last 2^20 tokens (10 batches of 100,000 rows); BatchTopK's running threshold. The line is the record."""
    sae, ceilings = JumpReLUSAE(8, 16) if arch == "jumprelu" else BatchTopKSAE(8, 16, k=2), []
    monkeypatch.setattr(train, "matmul_ceiling", lambda *a: ceilings.append(a) or 1e12)
    _clock(monkeypatch, 100.0, 102.5, 103.0)                          # Log() at 100 s, the record at 102.5 s
    fired_at = torch.tensor([0, 10, 11, 20] * 4)                     # at step 20, dead: last fired at step 10 or before
    x_BD = torch.randn(4, 8)
    log = train.Log(tmp_path / "log.jsonl", sae, x_BD, fired_at, batch_size=100_000, start=10, steps=40,
                    world=1, rank=0, autocast=autocast, quiet=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):   # the held-out batch at inference
        f_BF = sae.encode(x_BD)
        heldout = {"heldout_l0": (f_BF != 0).sum(1).float().mean().item(), "heldout_fvu": train.fvu(x_BD, sae.decode(f_BF).float())}
    r = log.write(20, {"loss": torch.tensor(2.0), "mse": torch.tensor(0.5), "l0": torch.tensor(3.0)}, 1e-3, 1e-4, "dense")
    tokens_per_s = 10 * 100_000 / 2.5
    assert ceilings == [(torch.device("cpu"), 100_000, 8, 16, torch.bfloat16 if autocast else torch.float32)]
    assert r == {"step": 20, "loss": 2.0, "mse": 0.5, "l0": 3.0, **heldout, "dead_fraction": 0.5,
                 "l0_coefficient": 1e-3, "lr": 1e-4, "path": "dense", "tokens_per_s": tokens_per_s,
                 "flops_per_s": 10 * 8 * 16 * tokens_per_s, "vs_ceiling": 10 * 8 * 16 * tokens_per_s / 1e12,
                 **({"threshold_running": sae.threshold.item()} if arch == "batchtopk" else {})}
    assert _log(tmp_path) == [r]


@pytest.mark.parametrize("world, lam", [(1, 1e-3), (2, None)])             # TopK has no lambda
def test_a_record_is_printed_and_shown_on_the_progress_bar(tmp_path, monkeypatch, capsys, world, lam):
    monkeypatch.setattr(train, "matmul_ceiling", lambda *a: 1e9)
    monkeypatch.setattr(train, "all_mean", lambda t, world: t)        # rank 0 of `world`, without a process group
    _clock(monkeypatch, 100.0, 102.5, 103.0)
    with train.Log(tmp_path / "log.jsonl", JumpReLUSAE(8, 16), torch.randn(4, 8), torch.tensor([0, 10, 11, 20] * 4),
                   batch_size=100_000, start=10, steps=40, world=world, rank=0, autocast=False, quiet=False) as log:
        r = log.write(20, {"loss": torch.tensor(2.0), "mse": torch.tensor(0.5), "l0": torch.tensor(3.0)}, lam, 1e-4, "dense")
    ratio = f"{10 * 8 * 16 * 400_000 / (world * 1e9):.2f}x"
    printed, bar = capsys.readouterr()
    assert printed == (f"step 20: loss 2.0000 mse 0.5000 L0 3.0 | held-out sample L0 {r['heldout_l0']:.1f} FVU "
                       f"{r['heldout_fvu']:.4f} | dead 50.0% {'lambda 0.001 ' if lam else ''}lr 0.0001 | 400,000 tok/s, "
                       f"{ratio} dense ceiling{' (2 ranks)' if world == 2 else ''}\n")
    assert f"dead=50.0%, fvu={r['heldout_fvu']:.3f}, l0={r['heldout_l0']:.1f}, tok_s=400,000, vs_ceiling={ratio}]" in bar   # sorted
    assert bar.startswith("\rtrain:  25%|") and "| 10/40 [" in bar and "step/s" in bar   # a resumed run's starts at its step
    for quiet, rank in ((True, 0), (False, 1)):                      # --quiet, and the other ranks: no bar
        assert train.Log(tmp_path / "log.jsonl", JumpReLUSAE(8, 16), torch.randn(4, 8), torch.zeros(16), batch_size=128,
                         start=0, steps=40, world=2, rank=rank, autocast=False, quiet=quiet).bar.disable


# --- The loss path ------------------------------------------------------------------------------


def test_auto_path_goes_sparse_only_when_few_latents_fire():
    below = train.SPARSE_BELOW
    assert train.choose_path("auto", 0.5 * below["cpu", False, False] * 4096, 4096, "cpu", False) == "sparse"
    assert train.choose_path("auto", 2.0 * below["cpu", False, False] * 4096, 4096, "cpu", False) == "dense"
    assert train.choose_path("auto", 50, 16_384, "cuda", True) == "dense"       # bf16 on a GPU: 0.3% is too many
    assert train.choose_path("auto", 50, 65_536, "cuda", True) == "sparse"
    assert train.choose_path("auto", 50, 65_536, "cuda", True, compiled=True) == "dense"   # compiled dense wins
    assert train.choose_path("auto", 50, 262_144, "cuda", True, compiled=True) == "sparse"
    assert train.choose_path("auto", 50, 16_384, "cuda", False) == "sparse"     # float32 on a GPU
    assert train.choose_path("dense", 1, 65_536, "cpu", False) == "dense"
    assert train.choose_path("sparse", 4096, 4096, "cpu", False) == "sparse"
    assert train.choose_path("auto", 100, 5000, "cpu", False) == "dense"          # sparse strictly below 2% of d_sae


def test_sparse_and_dense_paths_train_the_same_sae(tiny_acts, tmp_path):
    """Eight steps on each path from the same start end at the same weights, up to float rounding
    carried through Adam; the log says which path each logged step took."""
    _train(tiny_acts, tmp_path / "dense", path="dense")
    _train(tiny_acts, tmp_path / "sparse", path="sparse")
    dense, sparse = sae_folder.load(tmp_path / "dense"), sae_folder.load(tmp_path / "sparse")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(dense, name), getattr(sparse, name)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item(), msg=name)
    logs = {p: [r["path"] for r in _log(tmp_path / p)]
            for p in ("dense", "sparse")}
    assert logs == {"dense": ["dense"] * 4, "sparse": ["sparse"] * 4}


def test_auto_path_switches_to_sparse_and_resumes_on_the_same_path(tiny_acts, tmp_path, monkeypatch):
    """With a cut-off that 4 of 64 latents pass, auto starts dense (L0 unknown) and then goes sparse;
    the checkpoint keeps the last L0, so a resumed run takes the same path at every step."""
    monkeypatch.setitem(train.SPARSE_BELOW, ("cpu", False, False), 0.5)
    _train(tiny_acts, tmp_path / "whole", log_every=1)
    paths = [r["path"] for r in _log(tmp_path / "whole")]
    assert paths == ["dense"] + ["sparse"] * 7
    _killed_at_step_6(monkeypatch, lambda: _train(tiny_acts, tmp_path / "resumed", log_every=1))
    _train(tiny_acts, tmp_path / "resumed", log_every=1, resume=True)
    paths = [r["path"] for r in _log(tmp_path / "resumed")]
    assert paths == ["dense"] + ["sparse"] * 7
    whole, resumed = sae_folder.load(tmp_path / "whole"), sae_folder.load(tmp_path / "resumed")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name)), name


def test_sparse_path_is_jumprelus_alone(tiny_acts, tmp_path):
    with pytest.raises(ValueError, match="--path sparse is JumpReLU's"):
        _train(tiny_acts, tmp_path / "relu", arch="relu", path="sparse")


def test_compiled_loss_trains_the_same_sae(tiny_acts, tmp_path):
    """--compile (the default on CUDA) runs the same loss through torch.compile: same SAE up to rounding.
    In float64, so that a different summation order (it changes with the thread count) cannot flip a
    latent across its threshold: in float32 one flip moved W_enc by more than 1e-4 on one thread."""
    _train(tiny_acts, tmp_path / "eager", path="dense", compile=False, dtype=torch.float64)
    _train(tiny_acts, tmp_path / "compiled", path="dense", compile=True, dtype=torch.float64)
    eager, compiled = sae_folder.load(tmp_path / "eager"), sae_folder.load(tmp_path / "compiled")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(eager, name), getattr(compiled, name)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9 * a.abs().max().item(), msg=name)


def test_compiled_training_runs_the_sparse_path_eagerly(tiny_acts, tmp_path, monkeypatch):
    """The sparse path keeps a different number of entries each step; compiled, it recompiled at
    every step on a GPU. Only the dense steps may go through the compiled loss."""
    monkeypatch.setitem(train.SPARSE_BELOW, ("cpu", False, True), 0.5)
    calls = []

    def fake_compile(fn):
        def compiled(*a, **k):
            calls.append(k.get("sparse", False))
            return fn(*a, **k)
        return compiled

    monkeypatch.setattr(train.torch, "compile", fake_compile)
    _train(tiny_acts, tmp_path / "sae", compile=True, log_every=1)
    paths = [r["path"] for r in _log(tmp_path / "sae")]
    assert paths == ["dense"] + ["sparse"] * 7 and calls == [False]


# --- What the recipe promises ----------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["target_batch", "target_row"])
def test_training_ends_within_10_percent_of_the_target_l0(tiny_acts, tmp_path, sparsity):
    """The default quadratic penalty (on the batch mean) and Gemma Scope 2's (per row) hold L0 at K:
    300 steps on the tiny model end within 10% of K = 16 and K = 24 of 64 latents, held out. (At
    K = 4 the default lambda, tuned on SmolLM2 at K/d_sae = 0.7%, leaves L0 about 50% above K here.)"""
    for K in (16, 24):
        record = _train(tiny_acts, tmp_path / f"k{K}", steps=300, target_l0=K, sparsity=sparsity, log_every=100,
                        checkpoint_every=300)
        assert record["heldout_l0"] == pytest.approx(K, rel=0.1), K


@pytest.mark.parametrize("sparsity", ["target_batch", "tanh"])
def test_the_training_loss_is_the_recipes_loss_with_its_options(sparsity):
    """loss_functions binds the recipe to its loss: the target_batch penalty and the dead-threshold pull
    (penalties.py, on both paths; the sparse one alone reports "kept"), or Anthropic's loss with its
    constants in our units (anthropic.py, dense); one process averages the rows' L0 with torch.mean.
    Same loss and gradients, bit for bit."""
    torch.manual_seed(0)
    x_BD, dead_F = torch.randn(64, 8) * 0.3, torch.arange(32) % 4 == 0
    hp = {**train.RECIPES["small"], "sparsity": sparsity, "target_l0": 4}
    if sparsity == "tanh":
        hp = anthropic.in_our_units({**hp, **anthropic.DEFAULTS}, x_BD)
        assert hp["tanh_scale"] != 4.0 and hp["pre_act_coefficient"] > 0
        sae = anthropic.AnthropicJumpReLUSAE(8, 32, bandwidth=0.05, threshold_init=0.05)
        want = {"dense": functools.partial(sae.loss, tanh_scale=hp["tanh_scale"],
                                           pre_act_coefficient=hp["pre_act_coefficient"])}
    else:
        sae = JumpReLUSAE(8, 32, bandwidth=0.05, threshold_init=0.05)
        want = {path: functools.partial(penalties.loss, sae, penalty=penalties.target_batch(4), dead_pull=0.01,
                                        sparse=path == "sparse") for path in ("dense", "sparse")}
    losses = train.loss_functions(sae, hp, 1, "cpu")
    assert losses["path"] == ("dense" if sparsity == "tanh" else "auto") and losses["compiled"] is False
    for path, loss in want.items():
        got, expected = losses[path](x_BD, 1e-2, dead_F), loss(x_BD, 1e-2, dead_F)
        assert ("kept" in got) == (path == "sparse") and torch.equal(got["loss"], expected["loss"]), path
        for a, b, (name, _) in zip(torch.autograd.grad(got["loss"], list(sae.parameters())),
                                   torch.autograd.grad(expected["loss"], list(sae.parameters())), sae.named_parameters()):
            assert torch.equal(a, b), (path, name)


def test_the_pi_controller_starts_from_the_given_lambda_or_1e_3_where_a_target_sets_lambda():
    hp = {**train.RECIPES["small"], "sparsity": "l0", "target_l0": 32}
    for given, start in ((5e-3, 5e-3), (None, 1e-3)):
        assert train.make_controller({**hp, "l0_coefficient": given}).value == start
    for other in ({"sparsity": "target_batch"}, {"arch": "topk"}, {"target_l0": None, "l0_coefficient": 1e-3}):
        assert train.make_controller({**hp, **other}) is None, other


def test_init_from_data_keeps_each_of_its_promises():
    """On the sample: each threshold at the quantile that fires its latent on K/d_sae of the rows (L0
    = K, no latent dead), the bandwidth 0.3 x the median pre-activation std, the tied encoder and
    decoder orthogonal to the sample's top 2 singular directions with unit rows, b_dec its mean."""
    g = torch.Generator().manual_seed(0)
    sink = torch.randn(32, generator=g)
    x_ND = torch.randn(2000, 32, generator=g) + 0.5 + torch.randn(2000, 1, generator=g) * 5 * sink
    torch.manual_seed(1)
    sae = JumpReLUSAE(32, 128)
    train.init_from_data(sae, x_ND, 6, train.RECIPES["small"])
    top_KD = torch.linalg.svd(x_ND, full_matrices=False).Vh[:2]
    torch.testing.assert_close(sae.W_dec @ top_KD.T, torch.zeros(128, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and torch.equal(sae.b_dec, x_ND.mean(0))
    with torch.no_grad():
        pre_NF = sae.pre_acts(x_ND)
        assert sae.bandwidth == pytest.approx(0.3 * pre_NF.std(0).median().item())
        fires_NF = pre_NF > sae.threshold
    assert fires_NF.float().sum(1).mean().item() == pytest.approx(6, abs=0.1) and fires_NF.any(0).all()
    assert (fires_NF.sum(0) - 2000 * 6 / 128).abs().max() <= 2              # each latent its own quantile
    sae = JumpReLUSAE(32, 128)                  # K > d_sae / 2: each latent's median, no lower (b_enc lifts the
    with torch.no_grad():                       # medians above the bandwidth, the thresholds' floor)
        sae.b_enc.fill_(10.0)
        train.init_from_data(sae, x_ND, 100, train.RECIPES["small"])
        assert ((sae.pre_acts(x_ND) > sae.threshold).sum(0) - 1000).abs().max() <= 2


def test_processes_picks_cuda_where_there_is_one_and_under_torchrun_each_ranks_own_gpu(monkeypatch):
    """As on a GPU machine (torch.cuda faked): one process takes "cuda"; a torchrun rank takes the GPU of
    its LOCAL_RANK and makes it the current one; a device asked for is kept."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert train.processes(None) == train.processes("cuda") == (0, 0, 1, "cuda") and current == []
    assert train.processes("cpu") == (0, 0, 1, "cpu")
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.processes(None) == (1, 1, 2, "cuda:1") and current == ["cuda:1"]
    assert train.processes("cpu") == (1, 1, 2, "cpu") and current == ["cuda:1"]


@pytest.mark.parametrize("arch, sae_class", [("jumprelu", JumpReLUSAE), ("batchtopk", BatchTopKSAE)])
def test_train_keeps_to_the_device_and_dtype_it_is_given(tiny_acts, tmp_path, monkeypatch, arch, sae_class):
    """device="cpu" and float64 hold on a GPU machine (torch.cuda faked) whose default device is another
    one (meta: a tensor made without a device would have no data): every batch the SAE sees, the
    training, held-out and BatchTopK's calibration batches, is on the CPU in float64, and the SAE is saved."""
    seen, pre_acts = set(), sae_class.pre_acts
    monkeypatch.setattr(sae_class, "pre_acts", lambda self, x_BD: seen.add((x_BD.device.type, x_BD.dtype)) or
                        pre_acts(self, x_BD))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with torch.device("meta"):
        record = _train(tiny_acts, tmp_path / arch, arch=arch, dtype=torch.float64)
    assert seen == {("cpu", torch.float64)}
    assert math.isfinite(record["heldout_fvu"]) and formats.load_sae(tmp_path / arch).W_dec.isfinite().all()


def test_build_starts_from_the_recipes_bandwidth_and_thresholds():
    """Without the small recipe's data-driven start ("auto", "quantile"), a JumpReLU starts at the recipe's own
    bandwidth and threshold, whatever they are; TopK's k is the target L0."""
    sample_ND = torch.randn(64, 4)
    paper = {**train.RECIPES["paper"], "d_sae": 8, "target_l0": None}
    sae = train.build({**paper, "bandwidth": 0.01, "threshold_init": 0.05}, 4, sample_ND, "cpu")
    assert type(sae) is JumpReLUSAE and sae.bandwidth == 0.01 and torch.allclose(sae.threshold, torch.full((8,), 0.05))
    assert train.build({**paper, "arch": "topk", "target_l0": 3.0}, 4, sample_ND, "cpu").k == 3
    assert type(train.build({**paper, "sparsity": "tanh"}, 4, sample_ND, "cpu")) is anthropic.AnthropicJumpReLUSAE
    # The small recipe with a fixed lambda (no --target-l0): thresholds at the quantiles of an L0 of 32.
    x_ND = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    sae = train.build({**train.RECIPES["small"], "d_sae": 128, "target_l0": None}, 32, x_ND, "cpu")
    with torch.no_grad():
        assert (sae.pre_acts(x_ND) > sae.threshold).float().sum(1).mean().item() == pytest.approx(32, abs=0.1)


def test_training_batches_are_scaled_to_unit_mean_squared_norm(tiny_acts, tmp_path, monkeypatch):
    """Every batch the step sees is the raw activations times the input scale: E||x||^2 about 1."""
    seen, step = [], train.train_step

    def recording_step(sae, opt, loss_fn, x_BD, *a, **k):
        seen.append(x_BD)
        return step(sae, opt, loss_fn, x_BD, *a, **k)
    monkeypatch.setattr(train, "train_step", recording_step)
    _train(tiny_acts, tmp_path / "sae")
    norms = [x_BD.pow(2).sum(1).mean().item() for x_BD in seen]
    assert len(seen) == 8 and all(0.8 < s < 1.25 for s in norms), norms
    scale = _checkpoint_sae(tmp_path / "sae")[1]["scale"]                   # and they are acts.batches' stream from the seed
    stream = acts.batches(acts.open_split(tiny_acts, "train")[1], 128, 0)
    assert all(torch.equal(x_BD, next(stream) * scale) for x_BD in seen)


def test_global_mean_in_one_process_is_the_mean_with_its_gradient():
    l0_B = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    mean = train.global_mean(l0_B, world=1)
    mean.backward()
    assert mean.item() == 3.0 and torch.equal(l0_B.grad, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("settings, refusal", [
    (dict(target_l0=8, d_sae=7), "--d-sae 7 is fewer latents than an L0 of 8 needs"),
    (dict(recipe="paper"), "--recipe paper fixes lambda"),
    (dict(sparsity="tanh", path="sparse"), "--sparsity tanh trains on the dense path")])
def test_train_itself_refuses_what_check_settings_refuses_before_writing(tiny_acts, tmp_path, settings, refusal):
    """train() checks its settings, the width, recipe and sparsity included (the test above calls check_settings alone)."""
    with pytest.raises(ValueError) as info:
        _train(tiny_acts, tmp_path / "run", **settings)
    assert refusal in str(info.value) and not (tmp_path / "run").exists()


def test_d_sae_defaults_to_eight_times_d_in(tiny_acts, tmp_path):
    _train(tiny_acts, tmp_path / "run", d_sae=None, steps=2, checkpoint_every=2)
    assert sae_folder.load(tmp_path / "run").d_sae == 8 * acts.read_manifest(tiny_acts)["d_in"] == 256


def test_autocast_asked_for_on_a_cpu_runs_the_training_under_it(tiny_acts, tmp_path, monkeypatch):
    seen, pre_acts = [], JumpReLUSAE.pre_acts
    monkeypatch.setattr(JumpReLUSAE, "pre_acts", lambda self, x: seen.append(
        (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))) or pre_acts(self, x))
    _train(tiny_acts, tmp_path / "run", steps=2, checkpoint_every=2, autocast=True, path="dense")
    assert [autocast for grad, autocast in seen if grad] == [True, True]     # the two steps' losses
    assert (False, True) in seen                                              # and the held-out batch


def test_train_streams_its_batches_with_the_buffer_asked_for_or_acts_own_default(tiny_acts, tmp_path, monkeypatch):
    asked, batches = [], acts.batches
    monkeypatch.setattr(acts, "batches", lambda *a, **kw: asked.append(kw["buffer_rows"]) or batches(*a, **kw))
    _train(tiny_acts, tmp_path / "default", steps=2, checkpoint_every=2)
    _train(tiny_acts, tmp_path / "asked", steps=2, checkpoint_every=2, buffer_rows=4096)
    assert asked == [inspect.signature(batches).parameters["buffer_rows"].default, 4096]


def test_the_logged_lr_follows_the_small_recipes_warmup_and_decay(tiny_acts, tmp_path):
    """Each step's lr, as log.jsonl records it, is lr_at's with the recipe's decay over the last fifth."""
    _train(tiny_acts, tmp_path / "run", steps=10, log_every=1, checkpoint_every=10, lr_warmup_steps=1)
    logged = [r["lr"] for r in _log(tmp_path / "run")]
    assert logged == [train.lr_at(s, 10, train.RECIPES["small"]["lr"], 1, train.RECIPES["small"]["lr_decay_fraction"]) for s in range(10)]
    assert logged[-1] < logged[-2]                                         # the decay is there to see


@pytest.mark.parametrize("settings", [dict(sparsity="tanh"), dict(arch="topk")])
def test_auto_takes_the_sparse_path_only_for_jumprelus_own_sparsities(tiny_acts, tmp_path, settings):
    """At L0 4 of 512 latents "auto" would pick the sparse path, which is JumpReLU's with its L0 or target
    sparsities; tanh's pre-activation term and the baselines train on the dense path."""
    _train(tiny_acts, tmp_path / "run", d_sae=512, steps=3, log_every=1, checkpoint_every=3, **settings)
    paths = [r["path"] for r in _log(tmp_path / "run")]
    assert paths == ["dense"] * 3
    _train(tiny_acts, tmp_path / "jumprelu", d_sae=512, steps=3, log_every=1, checkpoint_every=3)
    assert _log(tmp_path / "jumprelu")[-1]["path"] == "sparse"


def test_the_saved_sae_names_its_model_and_gguf_file_and_topk_has_no_lambda(tiny_acts, tmp_path):
    """config.json's provenance comes from the manifest, the GGUF file's name included; TopK's sparsity is
    its k, so it records no l0_coefficient."""
    folder = _acts_copy(tiny_acts, tmp_path / "acts", gguf_file="model-q8.gguf")
    _train(folder, tmp_path / "jumprelu", steps=2, checkpoint_every=2)
    _train(folder, tmp_path / "topk", arch="topk", steps=2, checkpoint_every=2, l0_coefficient=1e-3)   # unused
    jumprelu, topk = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("jumprelu", "topk"))
    assert jumprelu["gguf_file"] == topk["gguf_file"] == "model-q8.gguf"
    assert jumprelu["model"] == acts.read_manifest(tiny_acts)["model"]
    assert topk["l0_coefficient"] is None and jumprelu["l0_coefficient"] > 0
