"""Tests for train.py under torchrun: two CPU processes (gloo) train what one process trains.

    python -m pytest -q test_distributed.py

Each torchrun test starts two Python processes with torch; on a 2-core machine they take a few
seconds each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import acts
import formats
import train
from test_train import _log


HERE = Path(__file__).parent
SETTINGS = dict(d_sae=64, steps=12, target_l0=4, batch_size=128, log_every=2, checkpoint_every=4,
                lr_decay_fraction=0.0, device="cpu")   # no decay: a run to 8 steps resumed to 12 is a run to 12
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _torchrun(acts_dir, out, log, *, world=2, env=None, dtype=None, **kw):
    """Run `world` ranks under torchrun, with SETTINGS and kw, and env added to the environment:
    train.py's command line, or with a dtype (which is not a flag) train() itself; (exit code,
    stdout and stderr). The ranks import train as this process does (tools/mutation.py relies on it)."""
    if dtype is None:
        flags = []
        for k, v in {**SETTINGS, **kw}.items():
            flag = "--" + k.replace("_", "-")
            flags += [flag] if v is True else [flag, str(v)]
        args = ["main", json.dumps(["--acts", str(acts_dir), "--out", str(out), *flags])]
    else:
        args = ["train", json.dumps([str(acts_dir), str(out), {**SETTINGS, **kw}]), dtype]
    (Path(log).parent / "ranks.py").write_text(RANKS.format(here=str(HERE)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(Path(log).parent / "ranks.py"), *args]
    with open(log, "w") as f:              # a file, not a pipe: nobody has to drain it while we wait
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}).returncode
    return code, Path(log).read_text()


RANKS = """import json, sys, torch
sys.path.insert(0, {here!r})
import train
if sys.argv[1] == "main":
    train.main(json.loads(sys.argv[2]))
else:
    acts_dir, out, settings = json.loads(sys.argv[2])
    train.train(acts_dir, out, dtype=getattr(torch, sys.argv[3]), **settings)
"""


def _one_process(acts_dir, out, **kw):
    """train.train in this process, on one thread like each torchrun rank: the SVD of the
    initialisation differs in its last bits with the thread count, and the quantile thresholds sit
    exactly on sample pre-activations, so such bits decide whether a latent fires."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.train(acts_dir, out, quiet=True, **{**SETTINGS, **kw})
    finally:
        torch.set_num_threads(threads)


def _assert_same_sae(one, two):
    """The two saved SAEs agree within TOLERANCE; returns the largest absolute difference."""
    a, b = formats.load_sae(one).state_dict(), formats.load_sae(two).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _logged_steps(folder):
    return [r["step"] for r in _log(folder)]


def _shards(sizes):
    """Fake shards whose row r of shard s holds the global row index in every column."""
    starts = np.cumsum([0] + sizes)
    return [(np.tile(np.arange(a, a + n, dtype=np.float32)[:, None], (1, 3)), None) for a, n in zip(starts, sizes)]


@pytest.mark.parametrize("start", [0, 5, 13])
def test_the_ranks_slices_make_up_the_one_process_batches(start):
    shards = _shards([3000, 2048, 5000])
    one = acts.batches(shards, 256, seed=2, start_step=start, buffer_rows=2048)
    ranks = [acts.batches(shards, 256, seed=2, start_step=start, buffer_rows=2048, rank=r, world=2) for r in (0, 1)]
    for _ in range(30):                                    # 30 x 256 rows: past several buffers and an epoch
        halves = [next(r) for r in ranks]
        assert all(h.shape == (128, 3) for h in halves)
        assert torch.equal(torch.cat(halves), next(one))


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tiny_acts, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 128 cannot be split evenly over 3 ranks"):
        _one_process(tiny_acts, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch, sparsity", [("jumprelu", "target_batch"), ("jumprelu", "l0"), ("topk", None)])
def test_two_ranks_train_what_one_process_trains(tiny_acts, tmp_path, arch, sparsity):
    extra = {"arch": arch, **({"sparsity": sparsity} if sparsity else {})}
    one = _one_process(tiny_acts, tmp_path / "one", **extra)
    code, output = _torchrun(tiny_acts, tmp_path / "two", tmp_path / "two.log", **extra)
    assert code == 0, output
    print(f"{arch} {sparsity}: largest difference {_assert_same_sae(tmp_path / 'one', tmp_path / 'two'):.2e}")
    # Rank 0 alone wrote: one record per log step, one line saying where the SAE went.
    assert _logged_steps(tmp_path / "two") == [2, 4, 6, 8, 10, 12]
    assert output.count("wrote the SAE to") == 1 and output.count("step 12: loss") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    two = _log(tmp_path / "two")[-1]
    for key in ("loss", "mse", "l0", "dead_fraction", "l0_coefficient"):      # logged over the global batch
        assert two[key] == (None if one[key] is None else pytest.approx(one[key], rel=1e-3, abs=1e-5)), key


@pytest.mark.parametrize("arch, d_sae", [("jumprelu", 64), ("topk", 512), ("relu", 64)])
def test_two_ranks_match_one_process_to_float64_rounding(tiny_acts, tmp_path, arch, d_sae):
    """In float64, two ranks differ from one process only in the order of their sums, a few units in
    the last place after 12 steps (3 at most when measured). The tolerance is 64 float64 units of each
    tensor's largest entry; at lr 1e-2 without warm-up every parameter moves by more than 1e10 times
    that (against a run at lr 0, which stays at the initialisation), and a rank that keeps its own
    b_dec gradient instead of the average moves every parameter by 1e-2 or more. TopK at 512 latents
    has dead latents (29-44%) in its AuxK window of one step: the latents that fired, AuxK and Var(x)
    must be the global batch's. Rank 0 logs the global batch's L0 and dead fraction, exactly: ReLU's
    L0 is its own rows' until train_step averages it, and the L1 coefficient's controller reads it."""
    extra = dict(arch=arch, d_sae=d_sae, lr_warmup_steps=0)              # SETTINGS has no lr decay
    for name, lr in (("one", 1e-2), ("start", 0.0)):
        _one_process(tiny_acts, tmp_path / name, dtype=torch.float64, lr=lr, **extra)
    code, output = _torchrun(tiny_acts, tmp_path / "two", tmp_path / "two.log", dtype="float64", lr=1e-2, **extra)
    assert code == 0, output
    one, two, start = (load_file(tmp_path / f / "checkpoint.safetensors") for f in ("one", "two", "start"))
    units = {}
    for name in (k for k in one if k.startswith("param.")):
        assert one[name].dtype == two[name].dtype == torch.float64, name
        unit = torch.finfo(torch.float64).eps * one[name].abs().max().item()
        units[name] = (one[name] - two[name]).abs().max().item() / unit
        assert units[name] <= 64, name
        assert (one[name] - start[name]).abs().max().item() > 1e10 * 64 * unit, name     # it moved
    print(f"{arch}: largest difference {max(units.values()):.1f} units in the last place")
    logs = [_log(tmp_path / f) for f in ("one", "two")]
    assert [(r["l0"], r["dead_fraction"]) for r in logs[1]] == [(r["l0"], r["dead_fraction"]) for r in logs[0]]
    assert arch != "topk" or min(r["dead_fraction"] for r in logs[0]) > 0.2


def test_the_ranks_keep_to_the_device_asked_for_whatever_torchs_default(tiny_acts, tmp_path):
    """Each rank's tensors are on --device (cpu), also those it broadcasts: a sitecustomize makes
    meta, where a tensor has no data, the default device of both ranks (as cuda would be for a
    tensor made without a device on a GPU machine, where NCCL takes CUDA tensors only)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        'import sys, torch\ntorch.set_default_device("meta")\nprint("default device meta", file=sys.stderr)\n')
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    code, output = _torchrun(tiny_acts, tmp_path / "two", tmp_path / "two.log", steps=4, env={"PYTHONPATH": path})
    assert code == 0, output
    assert output.count("default device meta") >= 3                  # torchrun and both ranks
    assert formats.load_sae(tmp_path / "two").W_dec.isfinite().all()


def test_a_run_resumed_under_torchrun_ends_where_an_uninterrupted_one_does(tiny_acts, tmp_path):
    _one_process(tiny_acts, tmp_path / "one")
    code, output = _torchrun(tiny_acts, tmp_path / "two", tmp_path / "first.log", steps=8)
    assert code == 0, output
    code, output = _torchrun(tiny_acts, tmp_path / "two", tmp_path / "resumed.log", resume=True)
    assert code == 0, output
    print(f"resumed: largest difference {_assert_same_sae(tmp_path / 'one', tmp_path / 'two'):.2e}")
    assert _logged_steps(tmp_path / "two") == [2, 4, 6, 8, 10, 12]


def test_batchtopk_under_torchrun_is_refused_in_one_sentence(tiny_acts, tmp_path):
    code, output = _torchrun(tiny_acts, tmp_path / "x", tmp_path / "x.log", arch="batchtopk")
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and all("--arch batchtopk" in e and "train it in one process" in e for e in errors)
    assert all(e.count(". ") == 0 and e.endswith(".") for e in errors)          # one sentence each
    assert not (tmp_path / "x").exists()
