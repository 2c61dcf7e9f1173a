"""Tests for harvest.py with several processes (torchrun) and with a hub data set (--dataset).

Two ranks are simulated in one process, one after the other, with harvest(rank=r, world=2); one
test launches the real torchrun. The datasets library is replaced by a fake module, so nothing is
downloaded.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import acts
import harvest


def _harvest(tiny_model, corpus, out, **kw):
    args = dict(model_name=str(tiny_model), layer=1, tokens=3000, text=[str(corpus)], context=16,
                batch_size=4, dtype="float32", heldout_every=5, shard_rows=150, device="cpu")
    return harvest.harvest(out, **{**args, **kw})


def _rows_by_window(folder, split):
    """{window's token ids: its activation rows} of a split, every shard's sha256 checked."""
    _, shards = acts.open_split(folder, split, verify=True)
    out = {}
    for rows, windows in shards:
        for i, w in enumerate(windows):
            out[tuple(w.tolist())] = np.array(rows[i * 15:(i + 1) * 15])
    return out


def _assert_same_windows(a, b):
    for split in acts.SPLITS:
        rows_a, rows_b = _rows_by_window(a, split), _rows_by_window(b, split)
        assert rows_a.keys() == rows_b.keys() and rows_a
        for w in rows_a:
            np.testing.assert_allclose(rows_a[w], rows_b[w], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single(tiny_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "acts"
    _harvest(tiny_model, corpus, out)
    return out


def test_two_ranks_give_the_windows_and_rows_of_one_process(tiny_model, corpus, single, tmp_path):
    out = tmp_path / "acts"
    first = _harvest(tiny_model, corpus, out, rank=0, world=2)
    assert first["rank"] == 0 and not (out / "manifest.json").exists()       # rank 1 is not done yet
    merged = _harvest(tiny_model, corpus, out, rank=1, world=2)               # the last one merges
    assert merged == acts.read_manifest(out) and merged["complete"] and merged["world_size"] == 2
    assert "rank" not in merged
    one = acts.read_manifest(single)
    for split in acts.SPLITS:
        for key in ("rows", "windows"):
            assert merged["splits"][split][key] == one["splits"][split][key]
        names = [s["acts"] for s in merged["splits"][split]["shards"]]
        assert names == sorted(names) and f"{split}/acts_r00_00000.npy" in names and f"{split}/acts_r01_00000.npy" in names
    assert merged["tokens"] == one["tokens"] and merged["text_exhausted"] == one["text_exhausted"]
    _assert_same_windows(single, out)              # held-out windows included: the same set


def test_a_killed_rank_resumes_to_the_same_folder(tiny_model, corpus, single, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    _harvest(tiny_model, corpus, out, rank=0, world=2)
    real_save, calls = acts.save_npy, {"n": 0}

    def dying_save(path, array):                   # rank 1 dies while writing its fourth shard file
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_save(path, array)

    monkeypatch.setattr(acts, "save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _harvest(tiny_model, corpus, out, rank=1, world=2)
    monkeypatch.setattr(acts, "save_npy", real_save)
    assert not (out / "manifest.json").exists()
    assert not acts.read_manifest(out, "manifest.rank01.json")["complete"]
    with pytest.raises(ValueError, match="already holds a harvest"):
        _harvest(tiny_model, corpus, out, rank=1, world=2)
    with pytest.raises(ValueError, match="was harvested by 2 processes, not 1") as info:
        _harvest(tiny_model, corpus, out, resume=True)
    assert str(info.value).count(". ") == 0
    _harvest(tiny_model, corpus, out, rank=1, world=2, resume=True)
    _assert_same_windows(single, out)
    # Done: a complete merged folder has nothing left to do, for any number of processes.
    assert _harvest(tiny_model, corpus, out, resume=True)["world_size"] == 2


def test_a_single_process_folder_refuses_a_resume_by_two(tiny_model, corpus, single, tmp_path):
    with pytest.raises(ValueError, match="was harvested by 1 process, not 2"):
        _harvest(tiny_model, corpus, single, rank=0, world=2, resume=True, tokens=6000)
    with pytest.raises(ValueError, match="already holds a harvest"):
        _harvest(tiny_model, corpus, single, rank=1, world=2)


def test_torchrun_with_two_processes_writes_one_folder(tiny_model, corpus, single, tmp_path):
    out = tmp_path / "acts"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "harvest.py", "--out", str(out), "--model", str(tiny_model), "--layer", "1",
                               "--tokens", "3000", "--text", str(corpus), "--context", "16", "--batch-size", "4",
                               "--dtype", "float32", "--heldout-every", "5", "--shard-rows", "150", "--device", "cpu"],
                              cwd=Path(harvest.__file__).parent, env={**env, "OMP_NUM_THREADS": "1"},
                              stdout=stdout, stderr=stderr, timeout=120).returncode
    assert code == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert (tmp_path / "stdout").read_text().count("wrote ") == 1          # rank 0 alone reports
    assert acts.read_manifest(out)["world_size"] == 2
    _assert_same_windows(single, out)


# --- --dataset, with a fake datasets library -------------------------------------------------------

def _fake_datasets(monkeypatch, rows=None, error=None):
    calls = []

    def load_dataset(name, split=None, streaming=False):
        calls.append((name, split, streaming))
        if error:
            raise error
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _corpus_rows(corpus):
    """The corpus as hub rows, in the order text_files reads it, with an extra column."""
    rows = [{"text": (corpus / "a.txt").read_text(), "id": 0}]
    rows += [{"text": json.loads(line)["text"], "id": i + 1} for i, line in enumerate(open(corpus / "b.jsonl"))]
    return rows


def test_a_streamed_dataset_harvests_like_the_same_text_from_files(tiny_model, corpus, single, tmp_path, monkeypatch):
    calls = _fake_datasets(monkeypatch, _corpus_rows(corpus))
    m = _harvest(tiny_model, corpus, tmp_path / "acts", text=None, dataset="someone/corpus")
    assert calls == [("someone/corpus", "train", True)] and m["text"] == {"dataset": "someone/corpus"}
    for split in acts.SPLITS:
        for (a, t), (b, u) in zip(acts.open_split(single, split)[1], acts.open_split(tmp_path / "acts", split)[1]):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(t, u)
    rows = [{"content": r["text"], "id": r["id"]} for r in _corpus_rows(corpus)]
    _fake_datasets(monkeypatch, rows)
    m = _harvest(tiny_model, corpus, tmp_path / "column", text=None, dataset="someone/corpus", dataset_column="content")
    assert m["text"] == {"dataset": "someone/corpus", "column": "content"}


def test_a_missing_column_names_the_columns(tiny_model, corpus, tmp_path, monkeypatch):
    _fake_datasets(monkeypatch, [{"content": "x", "id": 1}])
    with pytest.raises(SystemExit) as info:
        harvest.main(["--out", str(tmp_path / "acts"), "--model", str(tiny_model), "--dataset", "someone/corpus",
                      "--dataset-column", "body", "--device", "cpu"])
    message = str(info.value)
    assert "has no column 'body'" in message and "(content, id)" in message and "--dataset-column" in message
    assert message.count(". ") == 0 and not (tmp_path / "acts").exists()


@pytest.mark.parametrize("error", [ConnectionError("Couldn't reach the Hub"), OSError("network is unreachable")])
def test_no_network_says_to_pass_text(tiny_model, corpus, tmp_path, monkeypatch, error):
    _fake_datasets(monkeypatch, error=error)
    with pytest.raises(ValueError, match="there is no network") as info:
        _harvest(tiny_model, corpus, tmp_path / "acts", text=None, dataset="someone/corpus")
    assert "--text" in str(info.value) and str(info.value).count(". ") == 0
    assert not (tmp_path / "acts").exists()
