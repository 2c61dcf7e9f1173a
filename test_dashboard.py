"""Tests for dashboard.py: the offline site, rendered in headless Chromium, against NumPy.

Chromium runs the pages' scripts from disk (file://, no server), then prints the DOM they built
(--dump-dom, after the scripts and the data they load have run: --virtual-time-budget). Where
Chromium is absent the browser tests skip, saying so; .ci/run installs it.
"""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import acts
import baselines
import dashboard
import formats
import evaluate
import harvest
import train
from jumprelu import JumpReLUSAE

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def render(url, screenshot=None):
    """The DOM of `url` in headless Chromium once its scripts have run; with `screenshot`, a PNG of it."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
             "--window-size=1300,900"]
    run = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    if screenshot:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return run.stdout


@pytest.fixture(scope="module")
def site(tiny_acts, tmp_path_factory):
    """A JumpReLU SAE trained on the tiny model's activations, and its dashboard via evaluate.py."""
    folder = tmp_path_factory.mktemp("dash")
    train.train(tiny_acts, folder / "sae", d_sae=300, steps=30, target_l0=6, batch_size=128, quiet=True, device="cpu")
    evaluate.main([str(folder / "sae"), "--acts", str(tiny_acts), "--dashboard", str(folder / "site")])
    return folder


def numpy_features(sae_dir, tiny_acts):
    """f [rows, d_sae] of the held-out rows in float64, from the saved files alone (docs/maths.md section 1)."""
    w = {k: v.astype(np.float64) for k, v in load_file(str(sae_dir / "sae.safetensors")).items()}
    x = np.concatenate([a for a, _ in acts.open_split(tiny_acts, "heldout")[1]]).astype(np.float64)
    pre = x @ w["W_enc"] + w["b_enc"]
    return np.where(pre > w["threshold"], pre, 0.0)


def _rows(dom):
    """(latent, frequency text, visible) of each row of the index's table."""
    found = re.findall(r'<tr data-i="(\d+)" data-search="[^"]*"( style="display: none;")?>.*?<td>([\d.]+)%</td>', dom)
    return [(int(i), float(freq), not hidden) for i, hidden, freq in found]


@needs_chromium
def test_the_index_lists_every_latent_with_its_frequency_and_the_search_filters_them(site, tiny_acts):
    f = numpy_features(site / "sae", tiny_acts)
    rows = _rows(render((site / "site" / "index.html").as_uri()))
    assert [i for i, _, _ in rows] == list(range(300)) and all(shown for *_, shown in rows)
    np.testing.assert_allclose([freq for _, freq, _ in rows], 100 * (f != 0).mean(0), atol=6e-5)
    index = json.loads(re.search(r"DASH.index = (.*);", (site / "site" / "data" / "index.js").read_text()).group(1))
    word = next(t for _, _, _, tokens in index["latents"] for t in tokens.split() if t.isalpha() and len(t) > 3)
    for query in ("17", word):                                     # a latent's index, or a token it fires most on
        want = {i for i, _, _, tokens in index["latents"] if str(i) == query or query.lower() in f" {tokens.lower()} "}
        shown = {i for i, _, visible in _rows(render((site / "site" / "index.html").as_uri() + f"?q={query}")) if visible}
        assert shown == want and 17 in shown if query == "17" else 0 < len(shown) < 300 and shown == want


def _contexts(dom, box):
    """Each context line of the box `box` on a latent page: [(text, data-act, marked, alpha)]."""
    part = dom.split(f'id="{box}">')[1].split("<h2>")[0]
    lines = part.split('<div class="ctx">')[1:]
    def token(attrs, text):
        act, style = re.search(r'data-act="([^"]*)"', attrs).group(1), re.search(r'style="([^"]*)"', attrs)
        colour = [float(v) for v in re.findall(r"[\d.]+", style.group(1))] if style else [255, 120, 0, 0.0]
        assert colour[:3] == [255, 120, 0]
        return html.unescape(text), float(act), 'class="at"' in attrs, colour[3] if len(colour) > 3 else 1.0
    return [[token(*span) for span in re.findall(r"<span( data-act[^>]*)>(.*?)</span>", line)] for line in lines]


@needs_chromium
def test_a_latents_page_colours_each_token_by_its_activation_as_numpy_computes_it(site, tiny_acts):
    """The top contexts of the busiest latent: their marked tokens are its largest activations in
    order, every token's activation is NumPy's at that row (0 before the window's first row), and its
    colour's opacity is the activation over the latent's maximum."""
    f = numpy_features(site / "sae", tiny_acts)
    manifest, shards = acts.open_split(tiny_acts, "heldout")
    windows, rows_per = np.concatenate([w for _, w in shards]), manifest["context"] - 1
    latent = int((f != 0).sum(0).argmax())
    dom = render((site / "site" / "latent.html").as_uri() + f"#{latent}", screenshot=site / "latent.png")
    top = _contexts(dom, "top")
    order = np.argsort(-f[:, latent], kind="stable")[:dashboard.TOP]
    assert len(top) == dashboard.TOP and f"Latent {latent}" in dom
    tokenizer = harvest.load_tokenizer(manifest["model"])
    for context, row in zip(top, order):
        (at,) = [p for p, (_, _, marked, _) in enumerate(context) if marked]
        assert context[at][1] == pytest.approx(f[row, latent], abs=1e-4)
        window, pos = divmod(int(row), rows_per)
        first = pos + 1 - at                                       # the window position of the context's first token
        for p, (text, act, _, alpha) in enumerate(context):
            q = first + p
            want = f[window * rows_per + q - 1, latent] if q >= 1 else 0.0
            assert act == pytest.approx(want, abs=1e-4) and text == tokenizer.decode([int(windows[window, q])]).replace("\n", "\u21b5")
            assert alpha == pytest.approx(min(1.0, act / f[:, latent].max()), abs=2e-3)
    assert len(_contexts(dom, "random")) == dashboard.RANDOM and "Promoted tokens" in dom
    assert (site / "latent.png").stat().st_size > 10_000


def test_output_tokens_are_the_decoder_rows_through_the_unembedding():
    """Promoted and suppressed: the largest and smallest entries of W_dec[i] @ W_U^T, as NumPy ranks them."""
    torch.manual_seed(0)
    sae, W_U = JumpReLUSAE(8, 5), torch.randn(40, 8)
    got = dashboard.output_tokens(sae, W_U, lambda t: f"t{t}", batch=2)
    logits = sae.W_dec.detach().numpy().astype(np.float64) @ W_U.numpy().T.astype(np.float64)
    for i, (up, down) in enumerate(got):
        assert [t for t, _ in up] == [f"t{j}" for j in np.argsort(-logits[i])[:dashboard.LOGITS]]
        assert [t for t, _ in down] == [f"t{j}" for j in np.argsort(logits[i])[:dashboard.LOGITS]]
        np.testing.assert_allclose([v for _, v in up], np.sort(logits[i])[::-1][:dashboard.LOGITS], atol=1e-4)


@pytest.mark.parametrize("arch", [*baselines.ARCHITECTURES, "gemma_scope"])
def test_every_architecture_and_an_imported_sae_gets_its_site(tiny_acts, tmp_path, arch):
    """dashboard.write takes any SAE load_sae gives (a Gemma Scope params.npz here): every latent in
    the index, and each latent's top context marked at its largest held-out activation."""
    torch.manual_seed(0)
    sae = baselines.make_sae("jumprelu" if arch == "gemma_scope" else arch, 32, 40, k=3)
    with torch.no_grad():
        for name, q in sae.named_parameters():
            q.copy_(torch.randn(q.shape) * 0.3 - (2.0 if name == "log_threshold" else 0.0))
    if arch == "gemma_scope":
        w = {k: v.detach().numpy() for k, v in sae.state_dict().items() if k != "log_threshold"}
        np.savez(tmp_path / "params.npz", **w, threshold=sae.threshold.detach().numpy())
        sae = formats.load_sae(tmp_path / "params.npz")
    manifest, shards = acts.open_split(tiny_acts, "heldout")
    dashboard.write(sae, shards, harvest.load_tokenizer(manifest["model"]), tmp_path / "site",
                    context_rows=manifest["context"] - 1)
    data = lambda name, target: json.loads(re.search(target + r" = (.*);", (tmp_path / "site" / "data" / name).read_text())[1])
    index, chunk = data("index.js", "DASH.index"), data("latents_0000.js", r"DASH.chunks\[0\]")
    with torch.no_grad():
        f = sae.encode(np.concatenate([a for a, _ in shards])).numpy()
    assert [row[0] for row in index["latents"]] == list(range(40)) and (f != 0).any()
    for i, record in enumerate(chunk):
        assert record["freq"] == pytest.approx((f[:, i] != 0).mean())
        if record["top"]:
            assert record["top"][0]["tokens"][record["top"][0]["at"]][1] == pytest.approx(f[:, i].max(), abs=1e-4)
