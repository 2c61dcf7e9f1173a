"""Tests for acts.py: the activation folder (shards, manifest, checksums) and the training stream."""

import json

import numpy as np
import pytest
import torch

import acts

SETTINGS = dict(model="m", gguf_file=None, layer=1, site="resid", context=4, dtype="float32", heldout_every=5,
                source={"text": "t"})


def _folder(tmp_path, rank=0, world=1):
    manifest = acts.new_manifest(SETTINGS, "model.layers.1", 3, rank, world)
    for split in acts.SPLITS:
        (tmp_path / split).mkdir(parents=True, exist_ok=True)
    return manifest


def test_a_shard_counts_once_it_is_listed_and_reads_back_as_written(tmp_path):
    manifest = _folder(tmp_path)
    rows, windows = np.arange(18, dtype=np.float32).reshape(6, 3), np.arange(8, dtype=np.int32).reshape(2, 4)
    acts.append_shard(tmp_path, manifest, "train", rows, windows)
    acts.append_shard(tmp_path, manifest, "heldout", rows[:3] + 100, windows[:1])
    on_disk = acts.read_manifest(tmp_path)
    assert on_disk == manifest and on_disk["tokens"] == 9
    assert [s["acts"] for s in on_disk["splits"]["train"]["shards"]] == ["train/acts_00000.npy"]
    assert (on_disk["splits"]["train"]["rows"], on_disk["splits"]["train"]["windows"]) == (6, 2)
    _, shards = acts.open_split(tmp_path, "train")
    np.testing.assert_array_equal(shards[0][0], rows)
    np.testing.assert_array_equal(shards[0][1], windows)
    np.save(tmp_path / "train" / "acts_00000.npy", rows + 1)                # damaged under the manifest
    with pytest.raises(ValueError, match="acts_00000.npy does not match its sha256"):
        acts.open_split(tmp_path, "train")


def test_a_process_of_several_names_its_shards_and_manifest_by_rank(tmp_path):
    manifest = _folder(tmp_path, rank=1, world=2)
    name = acts.rank_manifest(1, 2)
    acts.append_shard(tmp_path, manifest, "train", np.zeros((3, 3), np.float32), np.zeros((1, 4), np.int32), name)
    assert name == "manifest.rank01.json" and not (tmp_path / "manifest.json").exists()
    assert acts.read_manifest(tmp_path, name)["splits"]["train"]["shards"][0]["acts"] == "train/acts_r01_00000.npy"
    assert acts.folder_worlds(tmp_path) == {2}


def test_an_edited_manifest_is_refused_unless_its_checksum_is_recomputed(tmp_path):
    manifest = _folder(tmp_path)
    acts.append_shard(tmp_path, manifest, "train", np.zeros((3, 3), np.float32), np.zeros((1, 4), np.int32))
    edited = json.loads((tmp_path / "manifest.json").read_text())
    edited["layer"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="does not match its own sha256"):
        acts.read_manifest(tmp_path)
    acts.write_manifest(tmp_path, edited)
    assert acts.read_manifest(tmp_path)["layer"] == 2


def _shards(sizes):
    """Fake shards whose row r of shard s holds the global row index in every column."""
    starts = np.cumsum([0] + sizes)
    return [(np.tile(np.arange(a, a + n, dtype=np.float32)[:, None], (1, 3)), None) for a, n in zip(starts, sizes)]


def test_stream_shuffles_across_shards_and_repeats_no_row_within_an_epoch():
    shards = _shards([3000, 2048, 5000])
    stream = acts.batches(shards, 256, seed=1, buffer_rows=4096)
    rows = torch.cat([next(stream)[:, 0] for _ in range(35)]).long().numpy()     # 35 x 256 < 10048 rows
    assert len(np.unique(rows)) == len(rows)                                     # no row twice
    first = next(acts.batches(shards, 256, seed=1, buffer_rows=4096))[:, 0].numpy()
    owners = np.searchsorted([3000, 5048, 10048], first, side="right")
    assert len(set(owners)) > 1                                                 # one batch mixes shards
    assert not np.array_equal(first, np.sort(first))                            # and is shuffled


def test_stream_resumes_at_any_step_without_reading_what_came_before():
    shards = _shards([3000, 2048, 5000])
    whole = [b for _, b in zip(range(50), acts.batches(shards, 512, seed=3, buffer_rows=2048))]
    for start in (0, 3, 17, 40):
        resumed = [b for _, b in zip(range(50 - start), acts.batches(shards, 512, seed=3, start_step=start, buffer_rows=2048))]
        assert all(torch.equal(a, b) for a, b in zip(whole[start:], resumed))


def test_sample_rows_draws_distinct_rows_from_every_shard():
    shards = _shards([300, 50, 700])
    rows = acts.sample_rows(shards, 400, seed=1)[:, 0].long().numpy()
    assert len(rows) == 400 and len(np.unique(rows)) == 400
    assert {int(np.searchsorted([300, 350, 1050], r, side="right")) for r in rows} == {0, 1, 2}
    assert torch.equal(acts.sample_rows(shards, 400, seed=1), acts.sample_rows(shards, 400, seed=1))
    assert len(acts.sample_rows(shards, 5000)) == 1050             # at most every row once


@pytest.mark.parametrize("rows, buffer_rows", [(3000, 2**18), (5000, 2048)])
def test_a_batch_no_buffer_can_hold_is_refused_not_a_hang(rows, buffer_rows):
    """A split (or a shuffle buffer) smaller than one batch: the plan never yielded and training hung."""
    with pytest.raises(ValueError, match="holds a batch of 4,096"):
        next(acts.stream_plan([rows], 4096, seed=0, buffer_rows=buffer_rows))
