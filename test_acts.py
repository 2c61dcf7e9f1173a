"""Tests for acts.py: the activation folder (shards, manifest, checksums) and the training stream."""

import json
import pickle

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


def test_a_new_manifest_records_the_harvest_and_a_rank_only_under_torchrun():
    want = {"format": 2, "model": "m", "gguf_file": None, "layer": 1, "site": "resid", "hook": "model.layers.1",
            "d_in": 3, "dtype": "float32", "context": 4, "text": {"text": "t"}, "bos": None, "separator": None,
            "split": "by document: every 5th document of the text is held out, and a document whose text the other "
                     "split already has is dropped", "settings": SETTINGS,
            "complete": False, "rows_per_window": 3, "tokens": 0,
            "splits": {s: {"rows": 0, "windows": 0, "shards": []} for s in ("train", "heldout")}}
    assert acts.new_manifest(SETTINGS, "model.layers.1", np.int64(3)) == want           # one process
    assert acts.new_manifest(SETTINGS, "model.layers.1", 3, 1, 2) == {**want, "rank": 1, "world_size": 2}


# Windows of context 4 (3 rows each, d_in 3): train windows 0-3 and held-out window 4. One process
# writes them in that order (here two to a shard); of two processes, rank 0 harvests windows 0, 2, 4
# and rank 1 windows 1, 3.
_WINDOWS = np.arange(20, dtype=np.int32).reshape(5, 4)
_ROWS = np.arange(45, dtype=np.float32).reshape(15, 3)


def _harvested(folder, shards_by_split, rank=0, world=1, exhausted=True, settings=SETTINGS, complete=True):
    """A folder (or one process's part of it) whose shards hold these windows of _WINDOWS."""
    folder.mkdir(exist_ok=True)
    manifest = acts.new_manifest(settings, "model.layers.1", 3, rank, world)
    for split in acts.SPLITS:
        (folder / split).mkdir(exist_ok=True)
    name = acts.rank_manifest(rank, world)
    for split, shards in shards_by_split.items():
        for ws in shards:
            rows = np.concatenate([_ROWS[3 * w:3 * w + 3] for w in ws])
            acts.append_shard(folder, manifest, split, rows, _WINDOWS[ws], name)
    manifest.update(text_exhausted=exhausted, complete=complete)
    acts.write_manifest(folder, manifest, name)
    return manifest


def _rows_by_window(folder, split):
    _, shards = acts.open_split(folder, split)               # every shard's sha256 checked
    return {tuple(w): rows[3 * i:3 * i + 3].tolist() for rows, windows in shards for i, w in enumerate(windows)}


def test_merged_ranks_make_the_manifest_one_process_would_write(tmp_path):
    counts = lambda m, split: [m["splits"][split][k] for k in ("rows", "windows")]
    one = _harvested(tmp_path / "one", {"train": [[0, 1], [2, 3]], "heldout": [[4]]})
    assert (counts(one, "train"), counts(one, "heldout")) == ([12, 4], [3, 1])         # summed over shards
    two = tmp_path / "two"
    _harvested(two, {"train": [[0, 2]], "heldout": [[4]]}, 0, 2, exhausted=False)
    _harvested(two, {"train": [[1, 3]]}, 1, 2, exhausted=True)                       # any that ran out
    merged = acts.merge_ranks(two, 2)
    assert merged == acts.read_manifest(two)                                         # written, sha256 valid
    same = lambda m: {k: v for k, v in m.items() if k not in ("splits", "world_size", "rank", "sha256")}
    assert same(merged) == same(one) and merged["tokens"] == one["tokens"] == 15 and merged["text_exhausted"]
    assert merged["world_size"] == 2 and "rank" not in merged
    for split in acts.SPLITS:
        assert counts(merged, split) == counts(one, split)
        assert _rows_by_window(two, split) == _rows_by_window(tmp_path / "one", split)
    names = [s["acts"] for s in merged["splits"]["train"]["shards"]]
    assert names == ["train/acts_r00_00000.npy", "train/acts_r01_00000.npy"]                  # rank 0's, then 1's
    assert acts.folder_worlds(two) == {2} and acts.folder_worlds(tmp_path / "one") == {1}
    assert acts.folder_worlds(tmp_path) == set()


def test_merge_waits_for_every_rank_and_refuses_ranks_that_disagree(tmp_path):
    _harvested(tmp_path / "a", {"train": [[0, 2]]}, 0, 2)
    assert acts.merge_ranks(tmp_path / "a", 2) is None                               # rank 1 has not started
    _harvested(tmp_path / "a", {"train": [[1, 3]]}, 1, 2, complete=False)            # rank 1 is still at work
    assert acts.merge_ranks(tmp_path / "a", 2) is None and not (tmp_path / "a" / "manifest.json").exists()
    _harvested(tmp_path / "b", {"train": [[0, 2]]}, 0, 2)
    _harvested(tmp_path / "b", {"train": [[1, 3]]}, 1, 2, settings={**SETTINGS, "layer": 2})
    _harvested(tmp_path / "c", {"train": [[0, 2]]}, 0, 2)
    _harvested(tmp_path / "c", {"train": [[1]]}, 1, 3)                               # a harvest by three
    for folder in ("b", "c"):
        with pytest.raises(ValueError, match="disagree on their settings"):
            acts.merge_ranks(tmp_path / folder, 2)
    _harvested(tmp_path / "d", {"heldout": [[4]]}, 0, 2)
    _harvested(tmp_path / "d", {}, 1, 2)
    with pytest.raises(ValueError, match="no complete training window"):
        acts.merge_ranks(tmp_path / "d", 2)


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


class _Payload:
    """Unpickling this runs `ran.append`: the code a hostile shard would run."""
    ran = []

    def __reduce__(self):
        return (_Payload.ran.append, ("unpickled",))


def test_an_array_of_objects_is_not_pickled_into_a_shard(tmp_path):
    with pytest.raises(ValueError, match="allow_pickle=False"):
        acts.save_npy(tmp_path / "a.npy", np.array([_Payload()], dtype=object))


@pytest.mark.parametrize("write", [
    lambda path: np.save(path, np.array([[_Payload()] * 3] * 3, dtype=object)),   # a .npy of objects
    lambda path: path.write_bytes(pickle.dumps(_Payload()))])                     # a bare pickle
def test_a_shard_of_pickled_objects_is_refused_without_unpickling_it(tmp_path, write):
    manifest = _folder(tmp_path)
    acts.append_shard(tmp_path, manifest, "train", np.zeros((3, 3), np.float32), np.zeros((1, 4), np.int32))
    write(tmp_path / "train" / "acts_00000.npy")
    with pytest.raises(ValueError, match="cannot be read as .npy"):
        acts.open_split(tmp_path, "train", verify=False)
    assert _Payload.ran == []


def test_damaged_tokens_or_a_shard_of_the_wrong_shape_are_refused(tmp_path):
    manifest = _folder(tmp_path)
    acts.append_shard(tmp_path, manifest, "train", np.zeros((3, 3), np.float32), np.zeros((1, 4), np.int32))
    np.save(tmp_path / "train" / "tokens_00000.npy", np.ones((1, 4), np.int32))
    with pytest.raises(ValueError, match="tokens_00000.npy does not match its sha256"):
        acts.open_split(tmp_path, "train")
    np.save(tmp_path / "train" / "acts_00000.npy", np.zeros((2, 3), np.float32))     # a row short
    with pytest.raises(ValueError, match=r"holds float32 \[2, 3\], but the manifest says \[3, 3\]"):
        acts.open_split(tmp_path, "train", verify=False)


def _shard0(m):
    return m["splits"]["train"]["shards"][0]


# What check_manifest says of a manifest harvest.py writes, after each edit (None: nothing wrong).
_EDITS = {
    "none": (lambda m: None, None),
    "no checksums": (lambda m: [_shard0(m).pop(k) for k in ("acts_sha256", "tokens_sha256")], None),  # older folders
    "d_in 1, context 2": (lambda m: m.update(d_in=1, context=2), None),                              # the smallest
    "empty": (lambda m: m.clear(), "d_in or context is not a valid whole number"),
    "d_in 0": (lambda m: m.update(d_in=0), "d_in or context is not a valid whole number"),
    "d_in true": (lambda m: m.update(d_in=True), "d_in or context is not a valid whole number"),
    "context 1": (lambda m: m.update(context=1), "d_in or context is not a valid whole number"),
    "context 4.0": (lambda m: m.update(context=4.0), "d_in or context is not a valid whole number"),
    "settings a list": (lambda m: m.update(settings=[]), "its settings or token count are malformed"),
    "tokens -1": (lambda m: m.update(tokens=-1), "its settings or token count are malformed"),
    "no splits": (lambda m: m.pop("splits"), "it has no train and heldout splits"),
    "no heldout": (lambda m: m["splits"].pop("heldout"), "it has no train and heldout splits"),
    "train a list": (lambda m: m["splits"].update(train=[]), "it has no train and heldout splits"),
    "no heldout shards": (lambda m: m["splits"]["heldout"].pop("shards"), "the heldout split has no list of shards"),
    "train shards a dict": (lambda m: m["splits"]["train"].update(shards={}), "the train split has no list of shards"),
    "a shard a string": (lambda m: m["splits"]["train"]["shards"].append("acts_00001.npy"),
                         "a shard entry of the train split is malformed"),
    "acts None": (lambda m: _shard0(m).update(acts=None), "a shard entry of the train split is malformed"),
    "no tokens file": (lambda m: _shard0(m).pop("tokens"), "a shard entry of the train split is malformed"),
    "rows -3": (lambda m: _shard0(m).update(rows=-3), "a shard entry of the train split is malformed"),
    "windows '1'": (lambda m: _shard0(m).update(windows="1"), "a shard entry of the train split is malformed"),
    "acts_sha256 0": (lambda m: _shard0(m).update(acts_sha256=0), "a shard checksum of the train split is malformed"),
    "tokens_sha256 None": (lambda m: _shard0(m).update(tokens_sha256=None),
                           "a shard checksum of the train split is malformed"),
}


@pytest.mark.parametrize("edit", _EDITS)
def test_a_damaged_manifest_is_refused_saying_what_is_wrong(edit):
    manifest = acts.new_manifest(SETTINGS, "model.layers.1", 3)
    manifest["splits"]["train"]["shards"].append({"acts": "train/acts_00000.npy", "tokens": "train/tokens_00000.npy",
                                                  "rows": 3, "windows": 1,
                                                  "acts_sha256": "0" * 64, "tokens_sha256": "0" * 64})
    change, problem = _EDITS[edit]
    change(manifest)
    assert acts.check_manifest(manifest) == problem


def test_a_manifest_rewritten_with_sorted_keys_still_reads(tmp_path):
    """Its sha256 is over canonical JSON: reformatting the file (jq -S, json.tool --sort-keys) is no edit."""
    manifest = _folder(tmp_path)
    acts.append_shard(tmp_path, manifest, "train", np.zeros((3, 3), np.float32), np.zeros((1, 4), np.int32))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()), sort_keys=True))
    assert acts.read_manifest(tmp_path) == manifest


def test_a_manifest_that_is_not_an_object_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"json is damaged \(it is not a JSON object\); harvest the folder again.$"):
        acts.read_manifest(tmp_path)


def _shards(sizes):
    """Fake shards whose row r of shard s holds the global row index in every column."""
    starts = np.cumsum([0] + sizes)
    return [(np.tile(np.arange(a, a + n, dtype=np.float32)[:, None], (1, 3)), None) for a, n in zip(starts, sizes)]


def _at_most_epochs(monkeypatch, n):
    """Fail, instead of hanging, once the stream plans more than n epochs (one numpy Generator each)."""
    real, calls = np.random.default_rng, []

    def rng(seed=None):
        calls.append(seed)
        assert len(calls) <= n, f"{len(calls)} epochs planned: the stream would loop forever"
        return real(seed)
    monkeypatch.setattr(np.random, "default_rng", rng)


def test_stream_shuffles_across_shards_and_repeats_no_row_within_an_epoch():
    shards = _shards([3000, 2048, 5000])
    stream = acts.batches(shards, 256, seed=1, buffer_rows=4096)
    rows = torch.cat([next(stream)[:, 0] for _ in range(35)]).long().numpy()     # 35 x 256 < 10048 rows
    assert len(np.unique(rows)) == len(rows)                                     # no row twice
    first = next(acts.batches(shards, 256, seed=1, buffer_rows=4096))[:, 0].numpy()
    owners = np.searchsorted([3000, 5048, 10048], first, side="right")
    assert len(set(owners)) > 1                                                 # one batch mixes shards
    assert not np.array_equal(first, np.sort(first))                            # and is shuffled


def test_stream_resumes_at_any_step_without_reading_what_came_before(monkeypatch):
    shards = _shards([3000, 2048, 5000])
    whole = [b for _, b in zip(range(50), acts.batches(shards, 512, seed=3, buffer_rows=2048))]
    _at_most_epochs(monkeypatch, 4 * 3)                     # 4 streams of at most 50 batches of 512: 3 epochs each
    for start in (0, 3, 17, 40):
        resumed = [b for _, b in zip(range(50 - start), acts.batches(shards, 512, seed=3, start_step=start, buffer_rows=2048))]
        assert len(resumed) == 50 - start and all(torch.equal(a, b) for a, b in zip(whole[start:], resumed))


@pytest.mark.parametrize("sizes, batch_size", [([1500, 1000], 100), ([256], 256)])
def test_each_epoch_is_every_row_once_in_a_new_order(sizes, batch_size):
    shards, rows = _shards(sizes), sum(sizes)
    stream = acts.batches(shards, batch_size, seed=0)
    epochs = [torch.cat([next(stream) for _ in range(rows // batch_size)]) for _ in range(3)]
    assert all(e.shape == (rows, 3) and e.dtype == torch.float32 for e in epochs)
    assert all(torch.equal(e[:, 0].sort().values, torch.arange(rows, dtype=torch.float32)) for e in epochs)
    assert not any(torch.equal(a, b) for a, b in zip(epochs, epochs[1:]))
    assert not torch.equal(next(acts.batches(shards, batch_size, seed=1)), epochs[0][:batch_size])  # the seed counts


def test_the_plan_is_seeded_by_seed_and_epoch_as_documented():
    """Numpy's Generator seeded by (seed, epoch) permutes the blocks, then the buffer's rows: a run resumed
    by a later version of this code must continue the same epoch."""
    plan = acts.stream_plan([1500, 1000], 300, seed=7)       # one buffer of 3 blocks, 2,500 rows: 8 batches
    blocks = [(0, 0), (0, 1024), (1, 0)]
    for epoch in range(3):
        rng = np.random.default_rng([7, epoch])
        group, order = next(plan)
        assert group == [blocks[j] for j in rng.permutation(3)]
        np.testing.assert_array_equal(order, rng.permutation(2500)[:2400])


def test_a_batch_comes_from_a_shuffle_buffer_of_buffer_rows():
    """buffer_rows=1024 is one block per buffer: each batch is rows of one block of one shard."""
    shards = _shards([3000, 2048, 5000])
    for batch in [b for _, b in zip(range(20), acts.batches(shards, 256, seed=0, buffer_rows=1024))]:
        r = batch[:, 0].long().numpy()
        s = np.searchsorted([3000, 5048, 10048], r, side="right")
        block = (r - np.array([0, 3000, 5048])[s]) // 1024
        assert len(set(zip(s, block))) == 1


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_slices_of_a_batch_make_the_one_process_batch(world):
    shards = _shards([1500, 1000])
    one = acts.batches(shards, 100, seed=0)
    ranks = [acts.batches(shards, 100, seed=0, rank=r, world=world) for r in range(world)]
    for _ in range(30):                                       # past the end of the first epoch (25 batches)
        assert torch.equal(torch.cat([next(r) for r in ranks]), next(one))


def test_a_nan_row_stops_the_stream_naming_its_shard_and_rows():
    shards = _shards([256, 256])
    shards[1][0][[5, 7, 9], 1] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="^shard 1 holds NaN or Inf activations in rows 5 to 9, met at step 0$"):
        next(acts.batches(shards, 512, seed=0))                # one batch holds every row


def test_sample_rows_draws_distinct_rows_from_every_shard():
    shards = _shards([300, 50, 700])
    rows = acts.sample_rows(shards, 400, seed=1)[:, 0].long().numpy()
    assert len(rows) == 400 and len(np.unique(rows)) == 400
    assert acts.sample_rows(_shards([300]), 10).dtype == torch.float32
    assert {int(np.searchsorted([300, 350, 1050], r, side="right")) for r in rows} == {0, 1, 2}
    assert torch.equal(acts.sample_rows(shards, 400, seed=1), acts.sample_rows(shards, 400, seed=1))
    assert len(acts.sample_rows(shards, 5000)) == 1050             # at most every row once


@pytest.mark.parametrize("rows, buffer_rows", [(3000, 2**18), (5000, 2048)])
def test_a_batch_no_buffer_can_hold_is_refused_not_a_hang(rows, buffer_rows, monkeypatch):
    """A split (or a shuffle buffer) smaller than one batch: the plan never yielded and training hung."""
    _at_most_epochs(monkeypatch, 1)
    with pytest.raises(ValueError, match="holds a batch of 4,096"):
        next(acts.stream_plan([rows], 4096, seed=0, buffer_rows=buffer_rows))
