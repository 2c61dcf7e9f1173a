"""Evaluate SAE folders on a harvested folder's held-out split (docs/maths.md section 5).

    python evaluate.py runs/sae --acts runs/acts                    # L0, MSE, FVU, dead and dense latents
    python evaluate.py runs/sae_* --acts runs/acts --lm --json runs/eval.json --plot runs/plots
    python evaluate.py runs/sae --acts runs/acts --latents 12,345   # what those latents fire on
    python evaluate.py runs/sae --acts runs/acts --dashboard runs/dash   # an offline site of every latent
    python evaluate.py runs/sae --acts runs/acts --absorption        # feature absorption (absorption.py)

Every number is computed on held-out rows, never on training rows. MSE is ||x - x_hat||^2 summed
over d_in and averaged over tokens, on the raw activations (train.py's log gives the same on inputs
scaled to E||x||^2 = 1; FVU compares across both). Width is d_sae; tokens, the tokens the SAE was
trained on, where its config says. With --lm the model of the
manifest runs over held-out windows three times: clean, with the SAE's reconstruction spliced in
place of the activation at the hook site (every position but the first), and with zeros there.
    delta LM loss      CE(spliced) - CE(clean)
    CE loss recovered  (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))
    KL                 KL(clean || spliced) of the next-token distributions
The cross-entropies cover the predictions made at spliced positions (1 to context-2).
With --absorption the model reads its vocabulary's single-token words, and absorption.py measures
how often another latent takes a first letter over from the SAE's latents for it (per letter and
their mean; --json and --plot carry them).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import absorption as feature_absorption
import acts
import cli
import harvest
from formats import load_sae, sae_path

DENSE = 0.1   # a latent firing on more than 10% of tokens is "dense" (docs/maths.md section 5)


def check_pairing(sae, manifest, folder, acts_dir, allow_mismatch=False):
    """The SAE must take the folder's activations: its width always, and the model, layer, site and
    module it was trained on, where its metadata says so, unless `allow_mismatch` (a deliberate
    comparison). An SAE that does not say (one imported from Gemma Scope, say) gets a warning."""
    if sae.d_in != manifest["d_in"]:
        raise ValueError(f"{folder} takes d_in={sae.d_in} but {acts_dir} holds d_in={manifest['d_in']} activations; "
                         "pair the SAE with the activations it was trained on.")
    md, name = sae.metadata, lambda key, v: harvest.hub_id(v) if key == "model" else v
    known = [k for k in ("model", "layer", "site", "hook") if md.get(k) is not None and manifest.get(k) is not None]
    if not known:
        print(f"warning: {folder} does not say which model, layer and site it was trained on; make sure {acts_dir} "
              "holds those activations.", file=sys.stderr)
    differ = [k for k in known if name(k, md[k]) != name(k, manifest[k])]
    if differ and not allow_mismatch:
        said = lambda d: ", ".join(f"{k} {d[k]}" for k in differ)
        raise ValueError(f"{folder} was trained on {said(md)} but {acts_dir} holds {said(manifest)}; pass the "
                         "activations it was trained on, or --allow-mismatch to compare them on purpose.")


@torch.no_grad()
def activation_metrics(sae, shards, batch_size=4096, device="cpu"):
    """L0, MSE, FVU, dead and dense fractions and per-latent firing frequencies over the rows."""
    n, sq_err, sum_x, sum_sq = 0, 0.0, None, 0.0
    fires_F = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    for rows_ND, _ in shards:
        for i in range(0, len(rows_ND), batch_size):
            x_BD = torch.from_numpy(np.array(rows_ND[i:i + batch_size], dtype=np.float32)).to(device)
            f_BF = sae.encode(x_BD)
            x_hat_BD = sae.decode(f_BF)
            active_BF = f_BF != 0
            fires_F += active_BF.sum(0)
            sq_err += (x_BD - x_hat_BD).double().pow(2).sum().item()
            sum_x = x_BD.double().sum(0) if sum_x is None else sum_x + x_BD.double().sum(0)
            sum_sq += x_BD.double().pow(2).sum().item()
            n += len(x_BD)
    variance = sum_sq - sum_x.pow(2).sum().item() / n           # sum ||x - mean||^2
    freq_F = (fires_F / n).cpu().numpy()
    fvu = sq_err / variance if variance > 0 else float("nan")   # rows all alike: nothing to explain
    return {"tokens": n, "l0": float(fires_F.sum().item() / n), "mse": sq_err / n, "fvu": fvu,
            "dead_fraction": float((freq_F == 0).mean()), "dense_fraction": float((freq_F > DENSE).mean()),
            "firing_frequency": freq_F}


def seed_stability(sae_a, sae_b, threshold=0.7):
    """docs/maths.md section 5 (Paulo and Belrose, 2025): the fraction of sae_a's latents matched one-to-one to
    one of sae_b's with cosine > threshold, by the Hungarian assignment that maximises the summed
    cosine; {"decoder": over the decoder rows, "encoder": over the encoder columns}."""
    from scipy.optimize import linear_sum_assignment
    out = {}
    for name, rows in (("decoder", lambda s: s.W_dec), ("encoder", lambda s: s.W_enc.T)):
        a_FD, b_FD = (torch.nn.functional.normalize(rows(s).detach().double().cpu(), dim=1) for s in (sae_a, sae_b))
        cos_FF = (a_FD @ b_FD.T).numpy()
        rows_a, rows_b = linear_sum_assignment(cos_FF, maximize=True)
        out[name] = float((cos_FF[rows_a, rows_b] > threshold).sum() / sae_a.d_sae)
    return out


class Splice:
    """A forward hook that replaces the site's output at positions 1.. with fn(output)."""

    def __init__(self, module, fn):
        self.module, self.fn = module, fn

    def __enter__(self):
        def hook(module, inputs, output):
            rest = output[1:] if isinstance(output, tuple) else None
            h = output[0] if isinstance(output, tuple) else output
            h = torch.cat([h[:, :1], self.fn(h[:, 1:]).to(h.dtype)], dim=1)
            return (h, *rest) if rest is not None else h
        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def lm_metrics(model, module, windows, saes, batch_size=8, device="cpu", progress=True):
    """Delta LM loss, CE loss recovered and KL for each SAE, on the same token windows."""
    totals = {"clean": 0.0, "zero": 0.0}
    per_sae = [{"ce": 0.0, "kl": 0.0} for _ in saes]
    count = 0
    steps = range(0, len(windows), batch_size)
    with tqdm(steps, desc="LM splice", disable=not progress) as bar:
        for i in bar:
            ids = torch.from_numpy(np.asarray(windows[i:i + batch_size], dtype=np.int64)).to(device)
            targets = ids[:, 2:]                           # predictions made at positions 1 .. T-2

            def logprobs():
                return torch.log_softmax(model(ids).logits[:, 1:-1].float(), dim=-1)

            def ce(lp):
                return -lp.gather(-1, targets.unsqueeze(-1)).sum().item()

            clean = logprobs()
            totals["clean"] += ce(clean)
            with Splice(module, torch.zeros_like):
                totals["zero"] += ce(logprobs())
            for sae, acc in zip(saes, per_sae):
                with Splice(module, lambda h, sae=sae: sae(h.float())):
                    spliced = logprobs()
                acc["ce"] += ce(spliced)
                acc["kl"] += (clean.exp() * (clean - spliced)).sum().item()
            count += targets.numel()
    ce_clean, ce_zero = totals["clean"] / count, totals["zero"] / count
    out = []
    for acc in per_sae:
        ce_spliced = acc["ce"] / count
        out.append({"ce_clean": ce_clean, "ce_zero": ce_zero, "ce_spliced": ce_spliced,
                    "delta_lm_loss": ce_spliced - ce_clean,
                    "ce_loss_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean),
                    "kl": acc["kl"] / count, "lm_tokens": count})
    return out


@torch.no_grad()
def top_contexts(sae, shards, tokenizer, latents, context_rows, k=5, width=12, device="cpu"):
    """The k held-out tokens on which each latent fires most, each with `width` tokens before it."""
    best = {i: [] for i in latents}
    for s, (rows_ND, _) in enumerate(shards):
        for r0 in range(0, len(rows_ND), 4096):
            x = torch.from_numpy(np.array(rows_ND[r0:r0 + 4096], dtype=np.float32)).to(device)
            f = sae.encode(x)[:, latents]
            for j, latent in enumerate(latents):
                vals, rows = f[:, j].topk(min(k, len(f)))
                best[latent] += [(v, s, r0 + r) for v, r in zip(vals.tolist(), rows.tolist()) if v > 0]
    lines = []
    for latent in latents:
        lines.append(f"latent {latent}:")
        top = sorted(best[latent], reverse=True)[:k]
        if not top:
            lines.append("  (never fires on the held-out tokens)")
        for value, s, row in top:
            window, pos = divmod(row, context_rows)
            tokens = shards[s][1][window]
            pos += 1                                   # rows start at the window's second position
            before = tokenizer.decode(tokens[max(0, pos - width):pos])
            lines.append(f"  {value:8.3f}  {before!r:>60} [[{tokenizer.decode(tokens[pos:pos + 1])}]]")
    return "\n".join(lines)


def plot(records, folder):
    """FVU and delta LM loss against L0, one series per architecture, and the firing-frequency histograms."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in ("fvu", "delta_lm_loss") if all(m in r for r in records)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for kind in sorted({_kind(r) for r in records}):       # one line per architecture, width and budget
            rs = sorted((r for r in records if _kind(r) == kind), key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in rs], [r[metric] for r in rs], "o-", label=kind)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel({"fvu": "FVU", "delta_lm_loss": "delta LM loss (nats)"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("sparsity-fidelity (held-out tokens)")
    fig.tight_layout()
    fig.savefig(folder / "sparsity_fidelity.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        freq = np.asarray(r["firing_frequency"])
        ax.hist(np.log10(freq[freq > 0]), bins=50, histtype="step",
                label=f"{r['name']} ({_kind(r)}; dead {r['dead_fraction']:.1%})")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "firing_frequency.png", dpi=120)
    plt.close("all")
    return [folder / "sparsity_fidelity.png", folder / "firing_frequency.png"]


def _kind(record):
    """An SAE's architecture, width and training tokens, as a plot's label."""
    tokens = record.get("trained_tokens")
    return f"{record['architecture']}, {record['d_sae']:,} latents" + (f", {tokens:,} tokens" if tokens else "")


def evaluate(sae_dirs, acts_dir, *, lm=False, lm_windows=64, absorption=False, device=None, progress=True,
             allow_mismatch=False):
    """One record per SAE folder (without the per-latent frequencies' bulk in the printed table)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest, shards = acts.open_split(acts_dir, "heldout")
    saes, records = [], []
    for folder in sae_dirs:
        sae = load_sae(folder, device)
        check_pairing(sae, manifest, folder, acts_dir, allow_mismatch)
        metrics = activation_metrics(sae, shards, device=device)
        records.append({"name": Path(folder).name, "path": str(folder), "architecture": sae.architecture,
                        "d_sae": sae.d_sae, "trained_tokens": sae.metadata.get("tokens"), **metrics})
        saes.append(sae)
    if lm or absorption:
        model, tokenizer = harvest.load_model(manifest["model"], device, torch.bfloat16 if device == "cuda" else torch.float32,
                                              manifest.get("gguf_file"))
    if lm:
        module = harvest.hook_module(model, manifest["layer"], manifest["site"])
        windows = np.concatenate([w for _, w in shards])[:lm_windows]
        if len(windows) < lm_windows:
            print(f"warning: --lm-windows {lm_windows} asked for more windows than {acts_dir}'s held-out split holds; "
                  f"the LM metrics use its {len(windows)}.", file=sys.stderr)
        for record, extra in zip(records, lm_metrics(model, module, windows, saes, device=device, progress=progress)):
            record.update(extra)
    if absorption:
        words = feature_absorption.collect(model, tokenizer, manifest["layer"], manifest["site"])
        for record, sae in zip(records, saes):
            record.update(feature_absorption.measure(sae, words))
    return records


def table(records):
    """The records as a text table; its header names each column as the module's docstring defines it."""
    cols = ["name", "d_sae", "trained_tokens", "l0", "mse", "fvu", "dead_fraction", "dense_fraction", "delta_lm_loss",
            "ce_loss_recovered", "kl", "absorption_fraction", "full_absorption_rate"]
    cols = [c for c in cols if any(c in r for r in records)]
    header = {c: {"d_sae": "width", "trained_tokens": "tokens"}.get(c, c) for c in cols}
    fmt = {"d_sae": "{:,}", "trained_tokens": "{:,}", "l0": "{:.1f}", "mse": "{:.4g}", "fvu": "{:.4f}",
           "dead_fraction": "{:.1%}", "dense_fraction": "{:.1%}", "delta_lm_loss": "{:.4f}", "ce_loss_recovered": "{:.1%}",
           "kl": "{:.4f}", "absorption_fraction": "{:.1%}", "full_absorption_rate": "{:.1%}"}
    rows = [[fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "" for c in cols] for r in records]
    widths = [max(len(header[c]), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(x.rjust(w) for x, w in zip(cells, widths))
    return "\n".join([line(header[c] for c in cols)] + [line(row) for row in rows])


def write_dashboards(folders, acts_dir, out):
    """dashboard.write for the SAE of each folder on the held-out split of `acts_dir` (to `out`, or
    out/<folder name> for several), with the tokenizer and unembedding of the manifest's model, loaded
    once (no output-token panel where its width is not d_in). Returns each site's index.html."""
    import dashboard
    manifest, shards = acts.open_split(acts_dir, "heldout")
    model, tokenizer = harvest.load_model(manifest["model"], "cpu", torch.float32, manifest.get("gguf_file"))
    embedding = model.get_output_embeddings()
    written = []
    for folder in folders:
        sae = load_sae(folder, "cpu")
        unembedding = embedding.weight.detach() if embedding is not None and embedding.weight.shape[1] == sae.d_in else None
        title = f"{Path(folder).name} on {manifest['model']} layer {manifest.get('layer')} {manifest.get('site')}"
        written.append(dashboard.write(sae, shards, tokenizer, Path(out) / (Path(folder).name if len(folders) > 1 else ""),
                                       context_rows=manifest["context"] - 1, unembedding_VD=unembedding, title=title))
    return written


latent_list = cli.check(lambda t: [int(i) for i in t.split(",")], lambda v: min(v) >= 0,
                        "latent indices separated by commas, such as 12,345")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("sae_dirs", nargs="+", type=sae_path, help="SAE folders (ours, SAELens's, or Gemma Scope params.npz)")
    p.add_argument("--acts", required=True, type=acts.folder, help="harvested folder whose held-out split is used")
    p.add_argument("--lm", action="store_true", help="also splice into the model: delta LM loss, CE recovered, KL")
    p.add_argument("--lm-windows", type=cli.positive_int, default=64, help="held-out windows for --lm (default 64)")
    p.add_argument("--absorption", action="store_true",
                   help="also measure feature absorption on the model's single-token words (absorption.py)")
    p.add_argument("--json", type=cli.out_file, help="write one record per SAE to this file (its folder must exist)")
    p.add_argument("--plot", type=cli.out_folder, help="write the sparsity-fidelity plot and firing histogram to this folder (created), "
                                                   "and with --absorption its bars per letter")
    p.add_argument("--latents", type=latent_list, help="comma-separated latent indices: print their top held-out contexts")
    p.add_argument("--dashboard", type=cli.out_folder,
                   help="write a static HTML dashboard of every latent to this folder (one subfolder an SAE with several); "
                        "open its index.html in a browser, offline")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="evaluate an SAE on activations of another model, layer or site than its own, on purpose")
    p.add_argument("--device", type=cli.device, default=None)
    args = p.parse_args(argv)
    try:
        records = evaluate(args.sae_dirs, args.acts, lm=args.lm, lm_windows=args.lm_windows, absorption=args.absorption,
                           device=args.device, allow_mismatch=args.allow_mismatch)
        print(table(records))
        if args.absorption:
            print("\n".join(feature_absorption.table(r) for r in records))
        if args.json:
            acts.write_json(args.json, [{**r, "firing_frequency": r["firing_frequency"].tolist()} for r in records])
            print(f"wrote {args.json}")
        if args.plot:
            plots = plot(records, args.plot) + ([feature_absorption.plot(records, args.plot)] if args.absorption else [])
            print("wrote " + ", ".join(map(str, plots)))
        if args.dashboard:
            print("wrote " + ", ".join(map(str, write_dashboards(args.sae_dirs, args.acts, args.dashboard))))
        if args.latents:
            latents = args.latents
            manifest, shards = acts.open_split(args.acts, "heldout")
            tokenizer = harvest.load_tokenizer(manifest["model"], manifest.get("gguf_file"))
            for folder in args.sae_dirs:
                sae = load_sae(folder)
                bad = [i for i in latents if not 0 <= i < sae.d_sae]
                if bad:
                    raise ValueError(f"--latents {bad} out of range: {folder} has latents 0 to {sae.d_sae - 1}.")
                print(f"== {folder}")
                print(top_contexts(sae, shards, tokenizer, latents, manifest["context"] - 1))
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:     # a full disk: a file written is whole or absent (atomic_write)
        sys.exit(f"error: writing {e.filename or args.json or args.plot} failed ({e.strerror or e}); free space or pass "
                 "another path.")


if __name__ == "__main__":
    main()
