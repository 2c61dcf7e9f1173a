"""An offline feature dashboard: a static HTML site of an SAE's latents on held-out activations.

    python evaluate.py runs/sae_l0_32 --acts runs/acts --dashboard runs/dash    # then open runs/dash/index.html

No server and nothing from the network: a browser opens it from disk. index.html lists every
latent with its firing frequency and mean activation, sorted by either, with a search box
(a latent's index, or a token it fires most on; index.html?q=TEXT opens with TEXT searched).
latent.html#I shows latent I: its top activating held-out contexts, each token coloured by the
latent's activation there (the value in its title and data-act); a few random contexts where it
fires; the histogram of its non-zero activations; and the output tokens its decoder row promotes
and suppresses most through the model's unembedding, W_dec[I] @ W_U^T, where the model has one.

The data is split so that no page loads more than it shows: data/index.js (a few numbers a
latent) and data/latents_NNNN.js, one per CHUNK latents, each a script that a page loads with a
<script> tag (browsers refuse fetch() from file:// pages, not scripts).
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sae_folder import atomic_write

CHUNK = 256          # latents a data file
TOP, RANDOM, BINS = 10, 5, 20      # top contexts, random firing contexts, histogram bins a latent
BEFORE, AFTER = 12, 3              # tokens shown before and after a context's token
LOGITS = 10                        # promoted and suppressed output tokens a latent


@torch.no_grad()
def firings(sae, shards, max_rows, batch_size=4096):
    """(rows, latents, values) of every non-zero feature on the first `max_rows` rows of the shards
    (rows counted across the shards), in order of row, as NumPy arrays; and the number of rows read."""
    found, n = [], 0
    with tqdm(total=min(max_rows, sum(len(a) for a, _ in shards)), unit="tok", desc="dashboard: encode") as bar:
        for rows_ND, _ in shards:
            rows_ND = rows_ND[:max_rows - n]
            for r0 in range(0, len(rows_ND), batch_size):
                f_BF = sae.encode(rows_ND[r0:r0 + batch_size]).float().cpu()
                rows, latents = f_BF.nonzero(as_tuple=True)
                found.append((rows.numpy() + n + r0, latents.numpy(), f_BF[rows, latents].numpy()))
                bar.update(len(f_BF))
            n += len(rows_ND)
    rows, latents, values = (np.concatenate(parts) for parts in zip(*found))
    return rows, latents, values, n


def contexts(rows_of, where, windows_WC, context_rows, text):
    """Each row's context: the tokens around it in its window, as [token text, activation] pairs with
    the row's own token marked, the activation the latent's at each of those tokens (`where`: row ->
    activation, 0 where it does not fire; a window's first token has no row, so no activation)."""
    out = []
    for row in rows_of:
        window, pos = divmod(int(row), context_rows)
        tokens, pos = windows_WC[window], pos + 1               # rows start at a window's second position
        span = range(max(0, pos - BEFORE), min(len(tokens), pos + AFTER + 1))
        base = int(row) - pos                                    # the row of position p is base + p
        out.append({"at": pos - span.start, "tokens": [[text(tokens[p]), round(where.get(base + p, 0.0), 4) if p else 0.0]
                                                       for p in span]})
    return out


def latent_record(i, rows, values, n, windows_WC, context_rows, text, rng):
    """Latent i's page data from its firing rows and values (in order of row)."""
    where = dict(zip(rows.tolist(), values.tolist()))
    top = rows[np.argsort(-values, kind="stable")[:TOP]]
    random = np.sort(rng.choice(rows, min(RANDOM, len(rows)), replace=False)) if len(rows) else rows
    counts, edges = np.histogram(values, bins=BINS, range=(0.0, float(values.max()))) if len(values) else ([], [0.0])
    return {"i": i, "freq": len(rows) / n, "mean": float(values.mean()) if len(values) else 0.0,
            "max": float(values.max()) if len(values) else 0.0, "hist": [int(c) for c in counts], "hist_max": float(edges[-1]),
            "top": contexts(top, where, windows_WC, context_rows, text),
            "random": contexts(random, where, windows_WC, context_rows, text)}


@torch.no_grad()
def output_tokens(sae, unembedding_VD, text, batch=256):
    """Per latent, ([token, logit] promoted most, [token, logit] suppressed most): W_dec @ W_U^T."""
    out = []
    W_U = unembedding_VD.float()
    for f0 in tqdm(range(0, sae.d_sae, batch), desc="dashboard: unembed", unit="chunk"):
        logits_FV = sae.W_dec[f0:f0 + batch].float() @ W_U.T
        up, down = logits_FV.topk(LOGITS), logits_FV.topk(LOGITS, largest=False)
        out += [([[text(t), round(v, 4)] for t, v in zip(u_i.tolist(), u_v.tolist())],
                 [[text(t), round(v, 4)] for t, v in zip(d_i.tolist(), d_v.tolist())])
                for u_v, u_i, d_v, d_i in zip(up.values, up.indices, down.values, down.indices)]
    return out


def write(sae, shards, tokenizer, out, *, context_rows, unembedding_VD=None, max_rows=2**16, seed=0, title=""):
    """Write the dashboard of `sae` on the first `max_rows` rows of the held-out `shards` to the folder
    `out`; returns its index.html. `unembedding_VD`: the model's [vocab, d_in] output embedding
    (None: no output-token panel)."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    rows, latents, values, n = firings(sae, shards, max_rows)
    windows_WC = np.concatenate([w for _, w in shards])         # whole windows a shard: row r is in window r // context_rows
    decoded = {}
    text = lambda t: decoded.setdefault(int(t), tokenizer.decode([int(t)]))
    logits = output_tokens(sae, unembedding_VD, text) if unembedding_VD is not None else None
    order = np.argsort(latents, kind="stable")                  # by latent, each in order of row
    starts = np.searchsorted(latents[order], np.arange(sae.d_sae + 1))
    rng, index = np.random.default_rng(seed), []
    for c0 in tqdm(range(0, sae.d_sae, CHUNK), desc="dashboard: write", unit="chunk"):
        chunk = []
        for i in range(c0, min(c0 + CHUNK, sae.d_sae)):
            mine = order[starts[i]:starts[i + 1]]
            record = latent_record(i, rows[mine], values[mine], n, windows_WC, context_rows, text, rng)
            if logits:
                record["promoted"], record["suppressed"] = logits[i]
            chunk.append(record)
            top_tokens = dict.fromkeys(_visible(c["tokens"][c["at"]][0]) for c in record["top"])   # by activation, once each
            index.append([i, round(record["freq"], 7), round(record["mean"], 4), " ".join(top_tokens)])
        _script(out / "data" / f"latents_{c0 // CHUNK:04d}.js", f"DASH.chunks[{c0 // CHUNK}]", chunk)
    meta = {"d_sae": sae.d_sae, "chunk": CHUNK, "rows": n, "title": title, "architecture": sae.architecture}
    _script(out / "data" / "index.js", "DASH.index", {"meta": meta, "latents": index})
    for name, page in (("index.html", INDEX_HTML), ("latent.html", LATENT_HTML)):
        atomic_write(out / name, lambda f, page=page: f.write(page.replace("/*STYLE*/", STYLE).encode()))
    return out / "index.html"


def _visible(token):
    """A token as the index shows it: without its spaces, or, if it is only white space, drawn."""
    return token.strip() or token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423") or "\u2205"


def _script(path, target, data):
    """A script that sets `target` to `data` (JSON), for a page to load with a <script> tag."""
    body = f"window.DASH = window.DASH || {{chunks: {{}}}};\n{target} = {json.dumps(data, separators=(',', ':'))};\n"
    atomic_write(path, lambda f: f.write(body.encode()))


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{padding:2px 10px;text-align:right}th{cursor:pointer;background:#eee}tr:nth-child(even){background:#f7f7f7}
td.tok{text-align:left;font-family:monospace}.ctx{font-family:monospace;white-space:pre;margin:3px 0;line-height:1.6}
.ctx span{border-radius:2px}.ctx span.at{outline:1px solid #c00}.val{display:inline-block;width:5em;color:#666}
h2{margin-top:1.2em;font-size:1.1em}.cols{display:flex;gap:3em}input{font-size:1em;padding:3px;width:20em}"""

INDEX_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>SAE latents</title><style>/*STYLE*/</style>
<script src="data/index.js"></script></head><body>
<h1 id="title">SAE latents</h1><p id="about"></p>
<p><input id="q" placeholder="search: a latent's index, or a token it fires on" autofocus>
<span id="shown"></span></p>
<table><thead><tr><th data-key="0">latent</th><th data-key="1">frequency</th><th data-key="2">mean activation</th>
<th>fires most on</th></tr></thead><tbody id="rows"></tbody></table>
<script>
const D = window.DASH.index, m = D.meta, body = document.getElementById("rows"), q = document.getElementById("q");
document.getElementById("title").textContent = (m.title || "SAE") + ": " + m.d_sae + " latents";
document.getElementById("about").textContent = m.architecture + " SAE; figures over " + m.rows + " held-out tokens";
for (const [i, freq, mean, tokens] of D.latents) {
  const tr = body.insertRow();
  tr.dataset.i = i; tr.dataset.search = " " + tokens.toLowerCase() + " ";
  tr.insertCell().innerHTML = '<a href="latent.html#' + i + '">' + i + "</a>";
  tr.insertCell().textContent = (100 * freq).toFixed(4) + "%";
  tr.insertCell().textContent = mean.toFixed(3);
  const cell = tr.insertCell(); cell.className = "tok"; cell.textContent = tokens;
}
function filter() {
  const text = q.value.trim().toLowerCase();
  let shown = 0;
  for (const tr of body.rows) {
    const hit = !text || tr.dataset.i === text || tr.dataset.search.includes(text);
    tr.style.display = hit ? "" : "none"; shown += hit;
  }
  document.getElementById("shown").textContent = shown + " of " + m.d_sae + " latents";
}
let sortedBy = 0, descending = false;
for (const th of document.querySelectorAll("th[data-key]")) th.onclick = () => {
  const key = +th.dataset.key;
  descending = key === sortedBy ? !descending : key !== 0; sortedBy = key;
  const rows = [...body.rows], value = (tr) => D.latents[+tr.dataset.i][key];
  rows.sort((a, b) => descending ? value(b) - value(a) : value(a) - value(b));
  rows.forEach((tr) => body.appendChild(tr));
};
q.addEventListener("input", filter);
q.value = new URLSearchParams(location.search).get("q") || "";
filter();
</script></body></html>
"""

LATENT_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>latent</title><style>/*STYLE*/</style>
<script src="data/index.js"></script></head><body>
<p><a href="index.html">all latents</a> | <a id="prev">previous</a> | <a id="next">next</a></p>
<h1 id="title"></h1><p id="stats"></p>
<div class="cols"><div><h2>Top activations</h2><div id="top"></div>
<h2>Random firing contexts</h2><div id="random"></div></div>
<div><h2>Non-zero activations</h2><div id="hist"></div>
<div class="cols"><div><h2>Promoted tokens</h2><table id="promoted"></table></div>
<div><h2>Suppressed tokens</h2><table id="suppressed"></table></div></div></div></div>
<script>
const i = parseInt(location.hash.slice(1)) || 0, m = window.DASH.index.meta, c = Math.floor(i / m.chunk);
document.getElementById("prev").href = "#" + Math.max(0, i - 1);
document.getElementById("next").href = "#" + Math.min(m.d_sae - 1, i + 1);
window.onhashchange = () => location.reload();
const s = document.createElement("script");
s.src = "data/latents_" + String(c).padStart(4, "0") + ".js";
s.onload = () => show(window.DASH.chunks[c][i - c * m.chunk]);
document.head.appendChild(s);
function contexts(id, list, max) {
  const box = document.getElementById(id);
  if (!list.length) box.textContent = "(never fires on these tokens)";
  for (const ctx of list) {
    const line = document.createElement("div"); line.className = "ctx";
    const val = document.createElement("span"); val.className = "val"; val.textContent = ctx.tokens[ctx.at][1].toFixed(3);
    line.appendChild(val);
    ctx.tokens.forEach(([text, act], p) => {
      const t = document.createElement("span");
      t.textContent = text.replace(/\\n/g, "\u21b5"); t.dataset.act = act; t.title = act.toFixed(4);
      if (p === ctx.at) t.className = "at";
      if (act > 0) t.style.background = "rgba(255,120,0," + Math.min(1, act / max).toFixed(3) + ")";
      line.appendChild(t);
    });
    box.appendChild(line);
  }
}
function tokens(id, list) {
  const table = document.getElementById(id);
  if (!list) { table.insertRow().insertCell().textContent = "(no unembedding)"; return; }
  for (const [text, logit] of list) {
    const tr = table.insertRow(), t = tr.insertCell();
    t.className = "tok"; t.textContent = JSON.stringify(text); tr.insertCell().textContent = logit.toFixed(3);
  }
}
function show(L) {
  document.title = "latent " + L.i;
  document.getElementById("title").textContent = "Latent " + L.i;
  document.getElementById("stats").textContent = "fires on " + (100 * L.freq).toFixed(4) + "% of " + m.rows +
    " held-out tokens; mean activation " + L.mean.toFixed(3) + ", max " + L.max.toFixed(3);
  contexts("top", L.top, L.max); contexts("random", L.random, L.max);
  const top = Math.max(1, ...L.hist), w = 16, h = 120;
  let svg = '<svg width="' + (w * L.hist.length + 40) + '" height="' + (h + 30) + '">';
  L.hist.forEach((n, b) => { const bh = h * n / top;
    svg += '<rect x="' + (b * w) + '" y="' + (h - bh) + '" width="' + (w - 2) + '" height="' + bh + '" fill="#e70"><title>' + n + "</title></rect>"; });
  svg += '<text x="0" y="' + (h + 15) + '" font-size="11">0</text><text x="' + (w * L.hist.length - 30) + '" y="' + (h + 15) +
    '" font-size="11">' + L.hist_max.toFixed(2) + "</text></svg>";
  document.getElementById("hist").innerHTML = svg;
  tokens("promoted", L.promoted); tokens("suppressed", L.suppressed);
  document.body.dataset.ready = "1";
}
</script></body></html>
"""
