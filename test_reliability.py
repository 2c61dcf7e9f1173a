"""Reliability and safety: a crash loses nothing, bad input gets a clear error, nothing unsafe loads.

    python -m pytest test_reliability.py

- A training run killed with SIGKILL at random steps and resumed ends bit-identical to one never
  interrupted; a full disk while harvesting, checkpointing or saving leaves a folder that reads
  and resumes; NaN appearing in the activations mid-run stops the run naming the shard and step.
- Hypothesis corrupts manifests, config.json files and safetensors headers at random: every case
  ends in a one-sentence ValueError or a load identical to the original, never a traceback.
"""

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import acts
import baselines
import evaluate
import formats
import harvest
import jumprelu
import sae_folder
import train


HERE = Path(__file__).parent


def _one_sentence(message):
    message = str(message)
    return "\n" not in message and message.count(". ") == 0 and "Traceback" not in message


def _disk_full_after(n_calls, calls):
    """An atomic_write stand-in: the n-th call writes half of its bytes, then the disk is full."""
    real = sae_folder.atomic_write

    def write(path, writer):
        calls.append(Path(path).name)
        if len(calls) != n_calls:
            return real(path, writer)
        buf = io.BytesIO()
        writer(buf)

        def half_then_full(f):
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, half_then_full)
    return write


def _no_tmp_files(folder):
    return not [p for p in Path(folder).rglob("*.tmp")]


# --- Training: SIGKILL, a full disk, NaN, divergence ---------------------------------------------

TRAIN_ARGS = ["--d-sae", "64", "--steps", "300", "--batch-size", "128", "--target-l0", "4", "--log-every", "1",
              "--checkpoint-every", "3", "--device", "cpu", "--seed", "3"]


def _train_cli(acts_dir, out, *extra):
    return subprocess.Popen([sys.executable, str(HERE / "train.py"), "--acts", str(acts_dir), "--out", str(out),
                             *TRAIN_ARGS, *extra], stdout=subprocess.DEVNULL, stderr=open(Path(out).parent / "stderr.txt", "a"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _logged_steps(folder):
    path = Path(folder) / "log.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n")]     # not a line a kill cut short


def test_ctrl_c_ends_in_one_line_naming_the_checkpoint_kept_and_the_command_that_carries_on(tiny_acts, tmp_path):
    """SIGINT, as Ctrl-C sends it, after a checkpoint: exit status 130, no traceback, and a last line
    that names the checkpoint and its step, and the command that carries on (which does)."""
    run = _train_cli(tiny_acts, tmp_path / "out")
    while (not _logged_steps(tmp_path / "out") or _logged_steps(tmp_path / "out")[-1] < 10) and run.poll() is None:
        time.sleep(0.002)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    err = (tmp_path / "stderr.txt").read_text()
    ckpt = tmp_path / "out" / "checkpoint.safetensors"
    step = train.read_checkpoint(ckpt, tensors=False)[0]["step"]
    command = f"python train.py --acts {tiny_acts} --out {tmp_path / 'out'} --resume"
    assert "Traceback" not in err and err.splitlines()[-1] == f"interrupted: {ckpt} (step {step}) is kept; carry on with: {command}"
    assert step >= 9 and step % 3 == 0
    resumed = subprocess.run([sys.executable, str(HERE / "train.py"), *command.split()[2:]], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and f"at step {step} of 300" in resumed.stdout and _logged_steps(tmp_path / "out")[-1] == 300


def test_sigkill_at_random_steps_then_resume_gives_bit_identical_weights(tiny_acts, tmp_path):
    whole = _train_cli(tiny_acts, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    rng = random.Random(7)
    kills = sorted(rng.sample(range(10, 250), 2))         # two kills, at random steps
    for n, at in enumerate(kills):
        run = _train_cli(tiny_acts, tmp_path / "killed", *(["--resume"] if n else []))
        while (not _logged_steps(tmp_path / "killed") or _logged_steps(tmp_path / "killed")[-1] < at) and run.poll() is None:
            time.sleep(0.002)
        assert run.poll() is None, "the run ended before it could be killed"
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert not (tmp_path / "killed" / "config.json").exists()      # no SAE folder from a killed run
    resumed = _train_cli(tiny_acts, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    a, b = load_file(str(tmp_path / "whole" / "sae.safetensors")), load_file(str(tmp_path / "killed" / "sae.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # The log has each step once, with the same losses as the uninterrupted run.
    log = lambda f: [json.loads(line) for line in (f / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log(tmp_path / "killed")] == list(range(1, 301))
    assert [r["loss"] for r in log(tmp_path / "killed")] == [r["loss"] for r in log(tmp_path / "whole")]


def _train(acts_dir, out, **kw):
    args = dict(d_sae=64, steps=12, target_l0=4, batch_size=128, log_every=2, checkpoint_every=4, quiet=True, device="cpu")
    return train.train(acts_dir, out, **{**args, **kw})


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tiny_acts, tmp_path, monkeypatch):
    _train(tiny_acts, tmp_path / "whole")
    calls = []
    monkeypatch.setattr(train, "atomic_write", _disk_full_after(2, calls))    # the step-8 checkpoint
    with pytest.raises(OSError):
        _train(tiny_acts, tmp_path / "full")
    assert calls == ["checkpoint.safetensors"] * 2 and _no_tmp_files(tmp_path / "full")
    monkeypatch.undo()
    _train(tiny_acts, tmp_path / "full", resume=True)                          # from step 4
    a, b = sae_folder.load(tmp_path / "whole"), sae_folder.load(tmp_path / "full")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_full_disk_from_the_command_line_is_one_sentence(tiny_acts, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "atomic_write", _disk_full_after(1, []))
    with pytest.raises(SystemExit) as info:
        train.main(["--acts", str(tiny_acts), "--out", str(tmp_path / "x"), "--d-sae", "64", "--steps", "8",
                    "--batch-size", "128", "--checkpoint-every", "4", "--device", "cpu"])
    assert "No space left on device" in str(info.value) and "--resume" in str(info.value)
    assert _one_sentence(str(info.value).removeprefix("error: "))


def test_full_disk_while_saving_an_sae_leaves_the_old_folder(tmp_path, monkeypatch):
    old = jumprelu.JumpReLUSAE(4, 8)
    sae_folder.save(old, tmp_path / "sae")
    real = sae_folder._write_tmp

    def full_on_config(path, write):
        if Path(path).name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)
    monkeypatch.setattr(sae_folder, "_write_tmp", full_on_config)
    with pytest.raises(OSError):
        sae_folder.save(jumprelu.JumpReLUSAE(4, 8), tmp_path / "sae")
    monkeypatch.undo()
    assert _no_tmp_files(tmp_path / "sae")
    assert torch.equal(sae_folder.load(tmp_path / "sae").W_enc, old.W_enc)


def _copy_acts(tiny_acts, tmp_path):
    shutil.copytree(tiny_acts, tmp_path / "acts")
    return tmp_path / "acts"


def test_nan_in_the_activations_is_found_before_training(tiny_acts, tmp_path):
    acts_dir = _copy_acts(tiny_acts, tmp_path)
    shard = np.load(acts_dir / "train" / "acts_00000.npy", mmap_mode="r+")
    shard[::7, 3] = np.nan
    shard.flush()
    with pytest.raises(ValueError, match="does not match its sha256") as info:      # the checksum sees it
        _train(acts_dir, tmp_path / "out")
    assert "train/acts_00000.npy" in str(info.value) and _one_sentence(info.value)
    manifest = json.loads((acts_dir / "manifest.json").read_text())                   # a harvest that wrote NaN
    manifest["splits"]["train"]["shards"][0]["acts_sha256"] = acts.sha256_file(acts_dir / "train" / "acts_00000.npy")
    acts.write_manifest(acts_dir, manifest)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        _train(acts_dir, tmp_path / "out")
    assert _one_sentence(info.value) and not (tmp_path / "out").exists()


def test_nan_appearing_mid_run_stops_naming_shard_and_step_and_keeps_the_checkpoint(tiny_acts, tmp_path, monkeypatch):
    acts_dir = _copy_acts(tiny_acts, tmp_path)
    real_lr_at = train.lr_at

    def damage_at_step_6(step, *a, **k):     # the disk under the memory map goes bad during the run
        if step == 6:
            for path in sorted((acts_dir / "train").glob("acts_*.npy")):
                shard = np.load(path, mmap_mode="r+")
                shard[:, 0] = np.inf
                shard.flush()
        return real_lr_at(step, *a, **k)
    monkeypatch.setattr(train, "lr_at", damage_at_step_6)
    with pytest.raises(ValueError) as info:
        _train(acts_dir, tmp_path / "out", buffer_rows=1024)       # one 1,024-row block per shuffle buffer
    message = str(info.value)
    assert "NaN or Inf" in message and "acts_0000" in message and "met at step" in message
    assert "the last good checkpoint is" in message and _one_sentence(message)
    step = int(message.split("met at step ")[1].split(";")[0])
    assert step >= 6
    with torch.no_grad():
        sae = jumprelu.JumpReLUSAE(32, 64)
        opt = torch.optim.Adam(sae.parameters())
        state = train.load_checkpoint(tmp_path / "out" / "checkpoint.safetensors", sae, opt, torch.zeros(64))
    assert state["step"] == 4 * (step // 4) and all(torch.isfinite(p).all() for p in sae.parameters())


def test_a_diverging_loss_stops_naming_the_step(tiny_acts, tmp_path):
    with pytest.raises(ValueError, match=r"the loss became (nan|inf) at step \d+") as info:
        _train(tiny_acts, tmp_path / "out", lr=1e30, steps=40)
    assert _one_sentence(info.value)


def test_resume_with_a_checkpoint_of_another_architecture_is_refused(tiny_acts, tmp_path):
    _train(tiny_acts, tmp_path / "out", steps=4)
    with pytest.raises(ValueError, match="--arch topk contradicts the jumprelu that .* was made with") as info:
        _train(tiny_acts, tmp_path / "out", arch="topk", steps=8, resume=True)
    assert _one_sentence(info.value)
    (tmp_path / "out" / "checkpoint.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="is damaged") as info:
        _train(tiny_acts, tmp_path / "out", steps=8, resume=True)
    assert _one_sentence(info.value)


# --- Harvest: a full disk ------------------------------------------------------------------------

def _harvest(tiny_model, corpus, out, **kw):
    args = dict(model_name=str(tiny_model), layer=1, tokens=3000, text=[str(corpus)], context=16,
                batch_size=4, dtype="float32", heldout_every=5, shard_rows=150, device="cpu")
    return harvest.harvest(out, **{**args, **kw})


def test_full_disk_while_harvesting_leaves_a_consistent_resumable_folder(tiny_model, corpus, tmp_path, monkeypatch):
    _harvest(tiny_model, corpus, tmp_path / "whole")
    for n in (1, 4, 5):                  # the first manifest, a shard, the manifest after a shard
        calls = []
        monkeypatch.setattr(acts, "atomic_write", _disk_full_after(n, calls))
        out = tmp_path / f"full{n}"
        with pytest.raises(OSError):
            _harvest(tiny_model, corpus, out)
        monkeypatch.undo()
        assert len(calls) == n and _no_tmp_files(out)
        if (out / "manifest.json").exists():
            manifest = acts.read_manifest(out)         # whole, and every listed shard checks out
            assert not manifest["complete"]
            for split in acts.SPLITS:
                if manifest["splits"][split]["shards"]:
                    acts.open_split(out, split)
            _harvest(tiny_model, corpus, out, resume=True)
        else:
            _harvest(tiny_model, corpus, out)
        for split in acts.SPLITS:
            for (a, t), (b, u) in zip(acts.open_split(tmp_path / "whole", split)[1], acts.open_split(out, split)[1]):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(t, u)


def test_harvest_cli_reports_a_full_disk_in_one_sentence(tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(acts, "atomic_write", _disk_full_after(3, []))
    with pytest.raises(SystemExit) as info:
        harvest.main(["--out", str(tmp_path / "acts"), "--model", str(tiny_model), "--layer", "1", "--tokens", "3000",
                      "--text", str(corpus), "--context", "16", "--shard-rows", "150", "--device", "cpu"])
    assert "No space left on device" in str(info.value) and "--resume" in str(info.value)


def test_a_damaged_shard_is_named(tiny_acts, tmp_path):
    acts_dir = _copy_acts(tiny_acts, tmp_path)
    path = acts_dir / "heldout" / "tokens_00000.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01                                       # one bit of one token id
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="heldout/tokens_00000.npy does not match its sha256") as info:
        acts.open_split(acts_dir, "heldout")
    assert _one_sentence(info.value)
    path.unlink()
    with pytest.raises(ValueError, match="tokens_00000.npy is missing"):
        acts.open_split(acts_dir, "heldout")


# --- Bad input at the command line -----------------------------------------------------------------

def test_layer_out_of_range_exits_with_one_sentence_and_writes_nothing(tiny_model, corpus, tmp_path):
    with pytest.raises(SystemExit) as info:
        harvest.main(["--out", str(tmp_path / "acts"), "--model", str(tiny_model), "--layer", "9",
                      "--text", str(corpus), "--device", "cpu"])
    assert "out of range: this model has layers 0 to 2" in str(info.value) and not (tmp_path / "acts").exists()


def test_an_sae_of_another_width_is_refused_by_evaluate_and_export(tiny_acts, tmp_path):
    sae_folder.save(jumprelu.JumpReLUSAE(48, 96), tmp_path / "sae")
    with pytest.raises(SystemExit) as info:
        evaluate.main([str(tmp_path / "sae"), "--acts", str(tiny_acts)])
    assert "takes d_in=48" in str(info.value) and _one_sentence(str(info.value).removeprefix("error: "))
    import export
    with pytest.raises(SystemExit) as info:
        export.main([str(tmp_path / "sae"), "--out", str(tmp_path / "sae.onnx"), "--acts", str(tiny_acts)])
    assert "takes d_in=48" in str(info.value) and not (tmp_path / "sae.onnx").exists()


def test_onnx_input_of_the_wrong_width_or_dtype_is_refused(tmp_path):
    import export
    import infer_onnx
    sae = jumprelu.JumpReLUSAE(6, 12)
    export.export(sae, tmp_path / "sae.onnx")
    sess, meta = infer_onnx.load(str(tmp_path / "sae.onnx"))
    with pytest.raises(ValueError, match=r"shape \[rows, 6\], got \[3, 5\]"):
        infer_onnx.encode(sess, meta, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        infer_onnx.encode(sess, meta, np.zeros((3, 6), np.int64))
    assert infer_onnx.encode(sess, meta, np.zeros((3, 6), np.float64))["features"].shape == (3, 12)


def test_nothing_is_unpickled_anywhere():
    for path in HERE.glob("*.py"):
        if path.name.startswith("test_"):
            continue
        source = path.read_text()
        assert "torch.load(" not in source and "pickle" not in source.replace("allow_pickle=False", ""), path.name
        for line in source.splitlines():
            if "np.load(" in line or "np.save(" in line:
                assert "allow_pickle=False" in line, (path.name, line)


# --- Hypothesis: random corruption of manifests, configs and tensor headers --------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def _paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON object."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _mutate(obj, data):
    """A copy of obj with one random change: a value replaced, a key deleted, or a key added."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p in _paths(obj) if p]
    path = data.draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    kind = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if kind == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
    else:
        parent[path[-1]] = data.draw(JSON)
    return obj


def _corrupt_bytes(raw, data):
    """raw with a random byte flipped, a slice cut out, or the end cut off."""
    kind = data.draw(st.sampled_from(["flip", "cut", "truncate"]))
    i = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        return raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    if kind == "cut":
        return raw[:i] + raw[i + data.draw(st.integers(1, 16)):]
    return raw[:i]


CORRUPTION = settings(max_examples=max(60, settings.default.max_examples // 4), suppress_health_check=list(HealthCheck), deadline=None)


@pytest.fixture(scope="module")
def acts_copy(tiny_acts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "acts"
    shutil.copytree(tiny_acts, folder)
    return folder


def _read_all(folder):
    out = {}
    for split in acts.SPLITS:
        _, shards = acts.open_split(folder, split)
        out[split] = [(np.array(a), np.array(t)) for a, t in shards]
    return out


@CORRUPTION
@given(data=st.data(), recompute=st.booleans(), as_bytes=st.booleans())
def test_a_corrupted_manifest_gives_an_error_or_the_same_data(acts_copy, data, recompute, as_bytes):
    path = acts_copy / "manifest.json"
    original = path.read_bytes()
    want = _read_all(acts_copy)
    try:
        if as_bytes:
            path.write_bytes(_corrupt_bytes(original, data))
        else:
            manifest = _mutate(json.loads(original), data)
            if recompute and isinstance(manifest, dict):        # a deliberate edit, checksum redone
                manifest["sha256"] = acts.manifest_digest(manifest)
            path.write_text(json.dumps(manifest))
        try:
            got = _read_all(acts_copy)
        except ValueError as e:
            assert _one_sentence(e), e
            return
        for split in acts.SPLITS:
            assert len(got[split]) == len(want[split])
            for (a, t), (b, u) in zip(got[split], want[split]):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(t, u)
    finally:
        path.write_bytes(original)


def _saved(tmp_path_factory, arch):
    torch.manual_seed(0)
    sae = baselines.make_sae(arch, 6, 16, k=3 if "topk" in arch else None)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae_folder.save(sae, tmp_path_factory.mktemp(arch) / "sae")


@pytest.fixture(scope="module", params=["jumprelu", "topk", "gated"])
def saved(request, tmp_path_factory):
    return _saved(tmp_path_factory, request.param)


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))


def _load_or_error(folder, want):
    """A clean error, or an SAE whose features and reconstructions equal the original's."""
    try:
        sae = formats.load_sae(folder)
    except ValueError as e:
        assert _one_sentence(e), e
        return
    with torch.no_grad():
        assert torch.equal(sae.encode(X), want.encode(X)) and torch.equal(sae(X), want(X))


@CORRUPTION
@given(data=st.data(), as_bytes=st.booleans())
def test_a_corrupted_config_gives_an_error_or_the_same_sae(saved, data, as_bytes):
    path = saved / "config.json"
    original = path.read_bytes()
    want = formats.load_sae(saved)
    try:
        if as_bytes:
            path.write_bytes(_corrupt_bytes(original, data))
        else:
            path.write_text(json.dumps(_mutate(json.loads(original), data)))
        _load_or_error(saved, want)
    finally:
        path.write_bytes(original)


@CORRUPTION
@given(data=st.data(), recompute=st.booleans())
def test_a_deliberately_edited_config_never_crashes(saved, data, recompute):
    """Edits with the checksum recomputed (or removed) load as edited, or end in a one-sentence error."""
    path = saved / "config.json"
    original, want = path.read_bytes(), formats.load_sae(saved)
    try:
        cfg = _mutate(json.loads(original), data)
        if isinstance(cfg, dict):
            cfg.pop("sha256", None)
            if recompute:
                cfg["sha256"] = sae_folder.folder_digest((saved / "sae.safetensors").read_bytes(), cfg)
        path.write_text(json.dumps(cfg))
        try:
            sae = formats.load_sae(saved)
        except ValueError as e:
            assert _one_sentence(e), e
            return
        # It loads as edited: with the settings config.json now names, and, where only provenance
        # changed, the same features as before the edit.
        settings = ("architecture", "d_in", "d_sae", "k", "bandwidth", "pre_encoder_bias")
        for key in settings:
            if key in cfg:
                assert getattr(sae, key) == cfg[key], key
        if all(cfg.get(k) == json.loads(original).get(k) for k in settings):
            with torch.no_grad():
                assert torch.equal(sae(X), want(X))
    finally:
        path.write_bytes(original)


@CORRUPTION
@given(data=st.data(), keep_sha=st.booleans())
def test_a_corrupted_safetensors_header_gives_an_error_or_the_same_sae(saved, data, keep_sha):
    weights, config = saved / "sae.safetensors", saved / "config.json"
    original_w, original_c = weights.read_bytes(), config.read_bytes()
    want = formats.load_sae(saved)
    header_end = 8 + int.from_bytes(original_w[:8], "little")
    try:
        i = data.draw(st.integers(0, header_end - 1))
        raw = original_w[:i] + bytes([original_w[i] ^ data.draw(st.integers(1, 255))]) + original_w[i + 1:]
        weights.write_bytes(raw)
        if not keep_sha:                                    # as a folder from another tool
            cfg = json.loads(original_c)
            del cfg["sha256"]
            config.write_text(json.dumps(cfg))
        _load_or_error(saved, want)
    finally:
        weights.write_bytes(original_w)
        config.write_bytes(original_c)
