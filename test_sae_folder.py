"""Tests for sae_folder.py: every SAE saves and loads exactly, and each way a folder can be wrong
ends in one sentence that names the folder (the baselines' own cases are in test_baselines.py).

    python -m pytest test_sae_folder.py
"""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sae_folder
from sae_folder import atomic_write, config_of, folder_digest, read_folder
from test_jumprelu import DEVICES, random_sae, zero_threshold_sae


@given(seed=st.integers(0, 2**31), pre_bias=st.booleans())
def test_save_then_load_is_exact(tmp_path_factory, seed, pre_bias):
    sae = random_sae(seed, pre_bias=pre_bias)
    sae.metadata.update(model="m", layer=3, site="resid", input_scale=0.25)
    folder = sae_folder.save(sae, tmp_path_factory.mktemp("sae"))
    loaded = sae_folder.load(folder)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert config_of(loaded) == config_of(sae)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(seed)) * 2
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    again = sae_folder.save(loaded, tmp_path_factory.mktemp("again"))
    assert (again / "sae.safetensors").read_bytes() == (folder / "sae.safetensors").read_bytes()


def test_folder_holds_gemma_scope_tensors_in_float32(tmp_path):
    """The folder (created with its parents) holds Gemma Scope's tensors in float32, and says so:
    config.json records the dtype, and the weights file's header names the architecture."""
    sae = random_sae(0, dtype=torch.float64)
    folder = sae_folder.save(sae, tmp_path / "new" / "sae")
    tensors = load_file(str(folder / "sae.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["threshold"], sae.threshold.float())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (6, 20)
    assert cfg["dtype"] == "float32"
    with safe_open(str(folder / "sae.safetensors"), "pt") as f:
        assert f.metadata() == {"architecture": "jumprelu"}


@given(seed=st.integers(0, 2**31), scale=st.floats(1e-2, 1e2), pre_bias=st.booleans())
def test_folded_scale_gives_same_features_on_raw_inputs(tmp_path_factory, seed, scale, pre_bias):
    sae = random_sae(seed, pre_bias=pre_bias, dtype=torch.float64)
    x_raw = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / scale
    with torch.no_grad():
        f_scaled, x_hat_scaled = sae.encode(x_raw * scale), sae(x_raw * scale)
        sae.fold_input_scale_(scale)
        f_raw, x_hat_raw = sae.encode(x_raw), sae(x_raw)
    assert sae.metadata["input_scale"] == scale
    torch.testing.assert_close(f_raw, f_scaled, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_hat_raw, x_hat_scaled / scale, rtol=1e-9, atol=1e-12)
    loaded = sae_folder.load(sae_folder.save(sae, tmp_path_factory.mktemp("folded")))
    assert loaded.metadata["input_scale"] == scale
    torch.testing.assert_close(loaded.encode(x_raw.float()), f_scaled.float(), rtol=1e-4, atol=1e-4)


def test_a_threshold_of_zero_saves_and_loads_exactly(tmp_path):
    """theta = 0 is saved as 0 and comes back as log_threshold -inf, whose exp is 0 again."""
    sae = zero_threshold_sae()
    back = sae_folder.load(sae_folder.save(sae, tmp_path / "sae"))
    assert torch.equal(back.threshold, sae.threshold) and torch.equal(back.log_threshold, sae.log_threshold)


def _saved(tmp_path):
    return sae_folder.save(random_sae(0), tmp_path)


def _rewrite_weights(folder, edit, raw=None):
    """Replace the weights (edited, or by raw bytes) as another tool would: no sha256 in config.json."""
    tensors = edit(load_file(str(folder / "sae.safetensors")))
    if raw is None:
        save_file(tensors, str(folder / "sae.safetensors"))
    else:
        (folder / "sae.safetensors").write_bytes(raw)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_config(folder, keep_sha=False, **changes):
    """Edit config.json; without keep_sha, as another tool would (no sha256 entry)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    if not keep_sha:
        del cfg["sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (lambda f: _edit_config(f, architecture="topk"), "has no valid 'k'"),
    (lambda f: _edit_config(f, architecture="sparse"), "names architecture 'sparse', which is none of jumprelu"),
    (lambda f: _edit_config(f, d_in=7), "W_dec of shape [20, 6], but config.json implies [20, 7]"),
    (lambda f: _edit_config(f, keep_sha=True, pre_encoder_bias=True), "does not match the sha256"),
    (lambda f: _edit_config(f, d_sae="20"), "no valid 'd_sae'"),
    (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "not list; re-save or restore the folder."),
    (lambda f: (f / "config.json").unlink(), "has no config.json; it is not an SAE folder written by this project."),
    (lambda f: (f / "sae.safetensors").write_bytes((f / "sae.safetensors").read_bytes()[:100]), "does not match the sha256"),
    (lambda f: _rewrite_weights(f, lambda t: t, (f / "sae.safetensors").read_bytes()[:100]), "cannot be read"),
    (lambda f: _rewrite_weights(f, lambda t: {k: v for k, v in t.items() if k != "threshold"}), "has no tensor 'threshold'"),
    (lambda f: _rewrite_weights(f, lambda t: {**t, "threshold": -torch.ones(20)}), "has 20 thresholds below 0"),
    (lambda f: _rewrite_weights(f, lambda t: {**t, "W_enc": t["W_enc"].double()}), "not float32"),
])
def test_load_rejects_a_bad_folder_in_one_sentence(tmp_path, damage, message):
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(ValueError) as info:
        sae_folder.load(folder)
    assert message in str(info.value) and str(folder) in str(info.value)    # it names the folder
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


def test_load_of_a_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        sae_folder.load(tmp_path / "nowhere")


@pytest.mark.parametrize("changes, refused", [
    ({"d_in": 1, "d_sae": 1, "k": 1}, None),
    ({"d_in": 0}, "no valid 'd_in'"),
    ({"d_sae": 0}, "no valid 'd_sae'"),
    ({"bandwidth": 1e-30}, None),
    ({"bandwidth": 0}, "invalid 'bandwidth'"),
    ({"pre_encoder_bias": True}, None),
    ({"pre_encoder_bias": "false"}, "invalid 'pre_encoder_bias'"),
    ({"k": 20}, None),
    ({"k": 0}, "invalid 'k'"),
    ({"k": 21}, "invalid 'k'"),
])
def test_read_folder_checks_each_setting_at_its_bounds(tmp_path, changes, refused):
    """read_folder, shared by every architecture, accepts d_in and d_sae from 1, a bandwidth above
    0, a bool pre_encoder_bias and k from 1 to d_sae (here 20), and refuses the values just outside."""
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    if refused is None:
        cfg, _ = read_folder(folder)
        assert {key: cfg[key] for key in changes} == changes
    else:
        with pytest.raises(ValueError, match=refused):
            read_folder(folder)


def test_load_fills_in_the_settings_a_folder_lacks(tmp_path):
    """A folder written by another tool may have no bandwidth or pre_encoder_bias: it loads with
    the defaults, bandwidth 0.001 and no pre-encoder bias."""
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("sha256", "bandwidth", "pre_encoder_bias"):
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    sae = sae_folder.load(folder)
    assert sae.bandwidth == 0.001 and sae.pre_encoder_bias is False


@pytest.mark.parametrize("device", DEVICES)
def test_load_builds_the_sae_on_the_device_asked_for(tmp_path, device):
    """Every parameter is allocated on `device`, whatever torch's default device is (meta here, so
    that a machine without a GPU shows it too), and holds the saved values."""
    sae = random_sae(0)
    with torch.device("meta"):
        loaded = sae_folder.load(sae_folder.save(sae, tmp_path), device=device)
    assert {p.device.type for p in loaded.parameters()} == {device}
    assert torch.equal(loaded.W_enc.cpu(), sae.W_enc) and torch.equal(loaded.threshold.cpu(), sae.threshold)


def test_folder_digest_covers_the_other_entries_in_canonical_json(tmp_path):
    """The sha256 is over config.json's other entries in canonical JSON: a tool that reorders the
    keys leaves the folder loadable, and the sha256 entry itself is not part of what it covers."""
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(reversed(list(cfg.items())))))
    sae_folder.load(folder)
    weights = (folder / "sae.safetensors").read_bytes()
    without = {key: value for key, value in cfg.items() if key != "sha256"}
    assert folder_digest(weights, cfg) == folder_digest(weights, without) == cfg["sha256"]


def test_atomic_write_raises_the_error_that_stopped_it(tmp_path, monkeypatch):
    """When the temporary file cannot even be created (a folder the user may not write to), the
    caller gets that error, not a second one from the clean-up, and nothing is left behind."""
    def refuse(*args, **kwargs):
        raise PermissionError(f"no permission to write in {tmp_path}")
    monkeypatch.setattr("sae_folder.open", refuse, raising=False)
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))
    assert not list(tmp_path.iterdir())
