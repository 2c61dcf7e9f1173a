"""Tests for harvest.py: hook sites, the early stop, the held-out split, resume, the offline model.

A tiny random Llama built from its transformers config and a BPE tokenizer trained here stand in
for a hub model, so nothing is downloaded; one test runs the real offline SmolLM2.
"""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import acts
import harvest


def _harvest(tiny_model, corpus, out, **kw):
    args = dict(model_name=str(tiny_model), layer=1, tokens=3000, text=[str(corpus)], context=16,
                batch_size=4, dtype="float32", heldout_every=5, shard_rows=150, device="cpu")
    return harvest.harvest(out, **{**args, **kw})


def _split(folder, split):
    _, shards = acts.open_split(folder, split)
    return np.concatenate([a for a, _ in shards]), np.concatenate([t for _, t in shards])


def test_resid_rows_are_the_layer_outputs_without_the_first_position(tiny_model, corpus, tmp_path):
    m = _harvest(tiny_model, corpus, tmp_path / "acts")
    assert m["complete"] and m["d_in"] == 32 and m["layer"] == 1 and m["hook"] == "model.layers.1"
    rows, windows = _split(tmp_path / "acts", "train")
    assert rows.shape == (len(windows) * 15, 32) and windows.shape[1] == 16
    model, _ = harvest.load_model(str(tiny_model), "cpu", torch.float32)
    with torch.no_grad():
        hidden = model(torch.from_numpy(windows).long(), output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding, so layer 1's output is hidden_states[2].
    expected = hidden[2][:, 1:].reshape(-1, 32).numpy()
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)


def test_mlp_and_attn_sites_add_up_to_the_residual_update(tiny_model, corpus, tmp_path):
    for site in ("mlp", "attn"):
        _harvest(tiny_model, corpus, tmp_path / site, site=site)
    mlp, windows = _split(tmp_path / "mlp", "train")
    attn, _ = _split(tmp_path / "attn", "train")
    model, _ = harvest.load_model(str(tiny_model), "cpu", torch.float32)
    with torch.no_grad():
        hidden = model(torch.from_numpy(windows).long(), output_hidden_states=True).hidden_states
    update = (hidden[2] - hidden[1])[:, 1:].reshape(-1, 32).numpy()   # Llama: h += attn; h += mlp
    np.testing.assert_allclose(mlp + attn, update, rtol=1e-4, atol=1e-5)
    assert np.abs(mlp).sum() > 0 and np.abs(attn).sum() > 0


def test_forward_stops_at_the_hooked_layer(tiny_model):
    model, _ = harvest.load_model(str(tiny_model), "cpu", torch.float32)
    later = []
    handle = model.model.layers[2].register_forward_hook(lambda *a: later.append(1))
    out = harvest.SiteReader(model, [(1, "resid")])(torch.zeros(2, 8, dtype=torch.long))[0]
    handle.remove()
    assert out.shape == (2, 8, 32) and later == []


def _kept(docs, heldout_every):
    """(split, text) of the documents each split keeps, by the definition: every heldout_every-th
    document is held out, the others train, and a document whose text the other split has kept
    already is left out. Also returns how many each split left out."""
    kept, dropped = {"train": [], "heldout": []}, {"train": 0, "heldout": 0}
    for i, doc in enumerate(docs):
        split = "heldout" if i % heldout_every == heldout_every - 1 else "train"
        if doc in kept["heldout" if split == "train" else "train"]:
            dropped[split] += 1
        else:
            kept[split].append(doc)
    return [(split, doc) for split in kept for doc in kept[split]], dropped


def _packed(tokenizer, docs, heldout_every, context, bos=None, separator=None):
    """The windows each split should hold, built here from the definition: the tokens of the
    documents each split keeps (_kept), each followed by a separator, cut into chunks, each after
    BOS when there is one."""
    streams = {"train": [], "heldout": []}
    for split, doc in _kept(docs, heldout_every)[0]:
        streams[split] += tokenizer(doc, add_special_tokens=False)["input_ids"] + [separator]
    size = context - (bos is not None)
    return {split: np.array([([bos] if bos is not None else []) + t[k:k + size]
                             for k in range(0, len(t) - size + 1, size)]) for split, t in streams.items()}


@pytest.mark.parametrize("bos", ["none", "added", "defined"])
def test_a_document_goes_wholly_to_one_split_and_windows_start_as_the_model_was_trained(
        tiny_model, bos_tokenizer, defined_bos_tokenizer, corpus, tmp_path, bos):
    """Every 5th document is held out whole; with a tokenizer that adds BOS (Gemma, Llama) every
    window starts with it, and with one that defines a BOS but does not add it (SmolLM2) none does;
    documents are separated by the end-of-text token (here the only one, EOS)."""
    model_dir = tmp_path / "model"
    model, tokenizer = harvest.load_model(str(tiny_model), "cpu", torch.float32)
    model.save_pretrained(model_dir)
    folder = {"none": tiny_model, "added": bos_tokenizer, "defined": defined_bos_tokenizer}[bos]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(model_dir)
    assert (tokenizer.bos_token_id is not None) == (bos != "none")
    m = _harvest(model_dir, corpus, tmp_path / "acts", heldout_every=5, tokens=20_000)
    bos_id, sep_id = (tokenizer.bos_token_id if bos == "added" else None), tokenizer.eos_token_id
    assert (m["bos"], m["separator"]) == (bos_id, sep_id) and m["split"].startswith("by document: every 5th")
    want = _packed(tokenizer, list(harvest.text_files([str(corpus)])), 5, 16, bos_id, sep_id)
    for split in acts.SPLITS:
        rows, windows = _split(tmp_path / "acts", split)
        np.testing.assert_array_equal(windows, want[split])          # the whole text: m["text_exhausted"]
        assert len(rows) == len(windows) * 15
        if bos == "added":
            assert (windows[:, 0] == bos_id).all()
    assert m["text_exhausted"] and m["splits"]["heldout"]["windows"] > 0


def test_no_text_is_in_both_splits_and_the_harvest_counts_what_it_dropped(tiny_model, tmp_path):
    """A corpus with duplicates, every 3rd document held out: a held-out copy of a training document
    is dropped, and so is a training copy of a held-out document that came first; copies within a
    split stay. The windows are the packing of what each split keeps, and the manifest counts the
    documents dropped."""
    texts = [f"Document {i}. The quick brown fox jumps over the lazy dog. " * 3 for i in range(8)]
    docs = [texts[0], texts[1], texts[0],          # 2, held out: a copy of training document 0
            texts[2], texts[2], texts[3],          # 3 and 4 train, alike; 5 held out
            texts[4], texts[3], texts[5],          # 7 trains: a copy of held-out document 5, which came first
            texts[6], texts[7], texts[5]]          # 11 held out, as 8 is
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = _harvest(tiny_model, tmp_path / "text", tmp_path / "acts", heldout_every=3, tokens=20_000)
    kept, dropped = _kept(docs, 3)
    assert m["text_exhausted"] and m["duplicates_dropped"] == dropped == {"train": 1, "heldout": 1}
    assert not {d for s, d in kept if s == "train"} & {d for s, d in kept if s == "heldout"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    want = _packed(tokenizer, docs, 3, 16, None, tokenizer.eos_token_id)
    for split in acts.SPLITS:
        np.testing.assert_array_equal(_split(tmp_path / "acts", split)[1], want[split])


class _OneTokenADocument:
    """Stands in for a tokenizer: each distinct text is one token (ids from 1), EOS is 0 and there is
    no BOS, so that windows of 2 tokens are one document each, with its separator."""
    bos_token_id, eos_token_id = None, 0

    def __init__(self):
        self.ids = {}

    def get_vocab(self):
        return {}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.ids.setdefault(text, len(self.ids) + 1)]}


def test_the_offline_texts_held_out_split_shares_no_document_text_with_its_training_split():
    """The offline Python docs, split as the default harvest splits them (every 20th document held
    out): each text it holds in both splits (2 on Python 3.11) is left out of the split where it came
    second, and the held-out texts and the training texts are then disjoint."""
    docs = harvest.python_docs()
    tokenizer, dropped = _OneTokenADocument(), {}
    windows = list(harvest.token_windows(docs, tokenizer, 2, 20, dropped=dropped))
    text_of = {i: text for text, i in tokenizer.ids.items()}
    texts = {split: {text_of[w[0]] for s, w in windows if s == split} for split in acts.SPLITS}
    in_both = {split: {d for i, d in enumerate(docs) if harvest.split_of(i, 20) == split} for split in acts.SPLITS}
    assert len(in_both["train"] & in_both["heldout"]) == sum(dropped.values()) > 0
    assert dropped == _kept(docs, 20)[1] and not texts["train"] & texts["heldout"]
    assert len(windows) == len(docs) - sum(dropped.values())                  # every other document is there


class _FakeReader:
    """Stands in for SiteReader at two sites: at each position, (token id, position, 0) and ten times that."""
    model = torch.nn.Linear(1, 1)

    def __call__(self, ids_BT):
        B, T = ids_BT.shape
        rows = torch.stack([ids_BT.float(), torch.arange(T).expand(B, T).float(), torch.zeros(B, T)], -1)
        return [rows, 10 * rows]


def _sink(folder, resume=False):
    settings = dict(model="m", gguf_file=None, layer=1, site="resid", context=4, dtype="float32", heldout_every=5,
                    source={"text": "t"})
    return harvest.open_sink(folder, acts.MANIFEST, settings, "model.layers.1", 3, resume, 0, 1)


def test_every_nth_document_is_held_out():
    assert [harvest.split_of(i, 5) for i in range(10)] == ["train"] * 4 + ["heldout"] + ["train"] * 4 + ["heldout"]


@pytest.mark.parametrize("heldout_every, tokens, small", [(5, 3000, True), (2, 6000, False)])
def test_a_held_out_split_too_small_to_trust_is_said_with_its_windows_and_documents(tiny_model, corpus, tmp_path, capsys,
                                                                                    heldout_every, tokens, small):
    """The warning counts the held-out windows written and the documents they hold tokens of,
    counted here from the text alone: a document whose first token lies before the end of the
    last window taken."""
    m = _harvest(tiny_model, corpus, tmp_path / "acts", heldout_every=heldout_every, tokens=tokens)
    windows = m["splits"]["heldout"]["rows"] // 15
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    separator = harvest.special_tokens(tokenizer)[1]
    starts = np.cumsum([0] + [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for i, d in
                              enumerate(harvest.text_files([str(corpus)])) if harvest.split_of(i, heldout_every) == "heldout"])
    documents = int((starts[:-1] < windows * 16).sum())              # 16-token windows: this tokenizer adds no BOS
    assert separator is not None and 0 < documents < len(starts) - 1 or not small
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warned == ([f"warning: the held-out split is {windows} windows from {documents} documents, too few to trust its "
                       "figures (at least 64 windows from 10 documents are wanted); pass more --tokens or text, or a "
                       "lower --heldout-every."] if small else [])
    assert small == (windows < 64 or documents < 10)


def test_read_batch_drops_the_first_position_and_refuses_nan():
    batch = [(0, "train", [7, 8, 9, 10], [0]), (1, "train", [11, 12, 13, 14], [0])]
    rows, tenfold = harvest.read_batch(_FakeReader(), batch, np.float16)
    assert rows.dtype == np.float16 and rows.shape == (2, 3, 3)
    np.testing.assert_array_equal(rows[1, :, :2], [[12, 1], [13, 2], [14, 3]])
    np.testing.assert_array_equal(tenfold, 10 * rows)
    nan_reader = lambda ids: [torch.full((*ids.shape, 3), math.nan)]
    nan_reader.model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="NaN or Inf activations .* near token 0"):
        harvest.read_batch(nan_reader, batch, np.float32)


def test_store_writes_a_shard_once_a_split_holds_enough_windows(tmp_path):
    sink = _sink(tmp_path)
    batch = [(i, "heldout" if i == 4 else "train", [i, i + 1, i + 2, i + 3], [0]) for i in range(5)]
    harvest.store(sink, 0, batch, harvest.read_batch(_FakeReader(), batch, np.float32)[0], 2)
    train = acts.read_manifest(tmp_path)["splits"]["train"]
    assert [s["windows"] for s in train["shards"]] == [2, 2] and len(sink["buffers"]["heldout"][0]) == 1
    harvest.flush(sink, "heldout")
    _, shards = acts.open_split(tmp_path, "heldout")
    np.testing.assert_array_equal(shards[0][1], [[4, 5, 6, 7]])
    np.testing.assert_array_equal(shards[0][0][:, 0], [5, 6, 7])            # positions 1 to 3 of window 4


def test_harvest_windows_runs_this_processs_share_and_skips_what_each_folder_holds(tmp_path):
    from tqdm import tqdm
    windows = [("heldout" if i % 5 == 4 else "train", [i] * 4) for i in range(30)]
    sinks = [_sink(tmp_path / "a"), _sink(tmp_path / "b")]
    sinks[0]["skip"]["train"] = 2              # as if folder a held two training windows, folder b one
    sinks[1]["skip"]["train"] = 1
    seen = harvest.harvest_windows(sinks, _FakeReader(), iter(windows), target_windows=20, rank=1, world=2,
                                   batch_size=3, shard_windows=100, np_dtype=np.float32, bar=tqdm(disable=True))
    assert seen == 20
    # Rank 1 of 2 takes the odd windows; of its training windows (1, 3, 5, ...) folder a held the
    # first two and folder b the first one; folder b's rows are ten times folder a's.
    for folder, first, scale in (("a", 5, 1), ("b", 3, 10)):
        _, train = acts.open_split(tmp_path / folder, "train")
        _, held = acts.open_split(tmp_path / folder, "heldout")
        assert train[0][1][:, 0].tolist() == [w for w in (1, 3, 5, 7, 11, 13, 15, 17) if w >= first]
        assert held[0][1][:, 0].tolist() == [9, 19] and held[0][0][0, 0] == 9 * scale


def test_several_sites_from_one_pass_equal_single_site_harvests(tiny_model, corpus, tmp_path):
    both = _harvest(tiny_model, corpus, tmp_path / "both", layer=[0, 1], site=["resid", "mlp"])
    assert [(m["layer"], m["site"]) for m in both] == [(0, "resid"), (0, "mlp"), (1, "resid"), (1, "mlp")]
    for layer, site in ((0, "mlp"), (1, "resid")):
        _harvest(tiny_model, corpus, tmp_path / f"one_{layer}_{site}", layer=layer, site=site)
        for split in acts.SPLITS:
            for a, b in zip(_split(tmp_path / f"one_{layer}_{site}", split), _split(tmp_path / "both" / f"L{layer}_{site}", split)):
                np.testing.assert_array_equal(a, b)


def test_resume_after_a_kill_gives_the_same_folder(tiny_model, corpus, tmp_path, monkeypatch):
    _harvest(tiny_model, corpus, tmp_path / "whole")
    calls = {"n": 0}
    real_save = acts.save_npy

    def dying_save(path, array):          # the process dies while writing the fourth shard file
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_save(path, array)

    monkeypatch.setattr(acts, "save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _harvest(tiny_model, corpus, tmp_path / "killed")
    monkeypatch.setattr(acts, "save_npy", real_save)
    partial = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not partial["complete"] and partial["splits"]["train"]["shards"]   # consistent, part-done
    acts.open_split(tmp_path / "killed", "train")                        # and readable as it is
    with pytest.raises(ValueError, match="already holds a harvest"):
        _harvest(tiny_model, corpus, tmp_path / "killed")
    _harvest(tiny_model, corpus, tmp_path / "killed", resume=True)
    for split in acts.SPLITS:
        for a, b in zip(_split(tmp_path / "whole", split), _split(tmp_path / "killed", split)):
            np.testing.assert_array_equal(a, b)


def test_bad_inputs_get_one_sentence_errors(tiny_model, corpus, tmp_path):
    with pytest.raises(ValueError, match="out of range: this model has layers 0 to 2"):
        _harvest(tiny_model, corpus, tmp_path / "a", layer=3)
    with pytest.raises(ValueError, match="does not exist"):
        _harvest(tiny_model, corpus, tmp_path / "b", text=[str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(ValueError, match="fewer than --context 16 tokens"):
        _harvest(tiny_model, corpus, tmp_path / "c", text=[str(empty)])
    assert not (tmp_path / "c").exists()                 # nothing half-written
    with pytest.raises(ValueError, match="has no manifest.json"):
        acts.open_split(tmp_path / "nowhere")


def test_manifest_cannot_point_outside_its_folder(tiny_model, corpus, tmp_path):
    _harvest(tiny_model, corpus, tmp_path / "acts")
    path = tmp_path / "acts" / "manifest.json"
    m = json.loads(path.read_text())
    m["splits"]["train"]["shards"][0]["acts"] = "../../etc/passwd"
    m["sha256"] = acts.manifest_digest(m)           # a deliberate edit can recompute the checksum
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="outside its folder"):
        acts.open_split(tmp_path / "acts")


def test_python_docs_is_real_english_and_deterministic():
    docs = harvest.python_docs()
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
    assert docs[:5] == harvest.python_docs()[:5]


def test_offline_smollm2_layer6_residual(tmp_path):
    m = harvest.harvest(tmp_path / "acts", tokens=600, context=64, batch_size=4, device="cpu")
    assert (m["model"], m["layer"], m["site"], m["d_in"], m["hook"]) == ("smollm2", 6, "resid", 576, "model.layers.6")
    rows, windows = _split(tmp_path / "acts", "train")
    assert rows.dtype == np.float16 and len(rows) == len(windows) * 63
    norms = np.linalg.norm(rows.astype(np.float32), axis=1)
    assert 50 < np.median(norms) < 200          # docs/maths.md section 6: about 100 on ordinary tokens


def test_dataset_without_the_datasets_library_says_how_to_get_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)        # import datasets -> ImportError
    with pytest.raises(ValueError, match="pip install datasets"):
        next(harvest.hub_dataset("some/dataset"))
