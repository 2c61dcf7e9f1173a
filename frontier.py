"""Reproduce the paper's headline: the sparsity-fidelity frontier of JumpReLU against the baselines.

    python harvest.py --out runs/acts           # once (demo.sh does it too): SmolLM2 layer 6, 425k tokens
    python frontier.py --acts runs/acts --out runs/frontier --results results/frontier_cpu
    python frontier.py --acts runs/acts --out runs/frontier --steps 250 2000 --seeds-steps 250   # two budgets

First a learning-rate sweep: every architecture at --sweep-at L0 (25) with each of --lrs, scored by
held-out FVU, at the first of --steps (a Matryoshka variant takes the rate of its architecture
where that is swept); each then trains with its best learning rate at every --targets L0, every
budget (--steps) and every seed (--seeds, at the --seeds-at targets and --seeds-steps budgets:
all by default), with the same width and data order. All are evaluated on held-out tokens, with
delta LM loss from splicing each into the model (and feature absorption with --absorption), and
each pair of seeds is compared latent by latent (evaluate.seed_stability). Writes RESULTS.md
(the sweep, the frontier and the means over seeds as markdown tables), RESULTS.json and
RESULTS.png (FVU and delta LM loss against L0). A finished run is skipped, a killed one resumed,
so the command can be run again.

The architectures (VARIANTS) and how each reaches a target L0 K: JumpReLU by its quadratic
target-L0 penalty (the small recipe of train.py), Anthropic's JumpReLU (jumprelu_tanh: train.py's
--sparsity tanh) by the PI controller on its tanh penalty's lambda, TopK and BatchTopK with k = K,
ReLU and Gated by the PI controller on their L1 coefficient, warmed up over the first 5% of the
steps; jumprelu_matryoshka and batchtopk_matryoshka as JumpReLU and BatchTopK, with Matryoshka
prefixes of 1/16 and 1/4 of the width (train.py's --matryoshka). The achieved, held-out L0 is what
the table and the plot use.
"""

import json
import platform
import sys
import time
from pathlib import Path

import torch

import acts
import cli
import evaluate
import train
from formats import load_sae
from sae_folder import atomic_write

# The frontier's rows: train.train's arguments for each. ReLU and Gated warm their L1 coefficient
# up linearly over the first L0_WARMUP of the steps (Anthropic's April 2024 update, which the Gated
# paper's authors recommend for both); the others hold L0 from the start.
# The Matryoshka variants' prefixes are these fractions of the width, then the width itself.
VARIANTS = {"jumprelu": {"arch": "jumprelu"}, "jumprelu_tanh": {"arch": "jumprelu", "sparsity": "tanh"},
            "relu": {"arch": "relu"}, "gated": {"arch": "gated"}, "topk": {"arch": "topk"},
            "batchtopk": {"arch": "batchtopk"},
            "jumprelu_matryoshka": {"arch": "jumprelu", "matryoshka": (1 / 16, 1 / 4)},
            "batchtopk_matryoshka": {"arch": "batchtopk", "matryoshka": (1 / 16, 1 / 4)}}
L0_WARMUP = 0.05
WITHIN = 0.1     # the sweep scores only runs whose held-out L0 is within 10% of the target (if any is)


def run_name(variant, target, seed, lr, steps):
    return f"{variant}_l0_{target:g}_seed{seed}_lr{lr:g}_steps{steps}"


def train_all(acts_dir, out, runs, d_sae, device):
    """Train (or resume, or skip) each (variant, target, seed, lr, steps) run; return the SAE folders in order."""
    folders = []
    for i, (variant, target, seed, lr, steps) in enumerate(runs):
        folder = Path(out) / run_name(variant, target, seed, lr, steps)
        folders.append(folder)
        if (folder / "config.json").is_file():
            print(f"[{i + 1}/{len(runs)}] {folder.name}: done already")
            continue
        kw = dict(VARIANTS[variant])
        if kw["arch"] in ("relu", "gated"):
            kw["l0_warmup_steps"] = round(L0_WARMUP * steps)
        if "matryoshka" in kw:
            kw["matryoshka"] = [max(1, round(q * d_sae)) for q in kw["matryoshka"]]
        t0 = time.perf_counter()
        r = train.train(acts_dir, folder, d_sae=d_sae, steps=steps, target_l0=target, seed=seed, lr=lr, quiet=True,
                        device=device, resume=True, **kw)       # a killed run carries on; a new one starts
        print(f"[{i + 1}/{len(runs)}] {folder.name}: held-out L0 {r['heldout_l0']:.1f}, FVU {r['heldout_fvu']:.4f}, "
              f"dead {r['dead_fraction']:.1%} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return folders


def best_lrs(records, target):
    """Each variant's learning rate with the lowest held-out FVU among its sweep runs whose L0 is
    within WITHIN of the target (among all of them if none is)."""
    best = {}
    for variant in {r["variant"] for r in records}:
        rs = [r for r in records if r["variant"] == variant]
        near = [r for r in rs if abs(r["l0"] - target) <= WITHIN * target] or rs
        best[variant] = min(near, key=lambda r: r["fvu"])["lr"]
    return best


def stability(records):
    """evaluate.seed_stability of seed 0 against seed 1 for each (variant, target, steps) trained with
    both; written into both records as "decoder_match" and "encoder_match"."""
    by_key = {(r["variant"], r["target"], r["steps"], r["seed"]): r for r in records}
    for (variant, target, steps, seed), r in by_key.items():
        other = by_key.get((variant, target, steps, 1))
        if seed == 0 and other:
            match = evaluate.seed_stability(load_sae(r["path"]), load_sae(other["path"]))
            for rec in (r, other):
                rec.update(decoder_match=match["decoder"], encoder_match=match["encoder"])


def tokens(r, batch_size):
    """A run's training budget, as a short label: 512k, 4.1M."""
    n = r["steps"] * batch_size
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def spreads(records):
    """One row per (variant, target, steps): the mean of each metric over its seeds and, where it has
    several, their range (max - min), the seed spread the verdicts are held against."""
    groups = {}
    for r in records:
        groups.setdefault((r["variant"], r["target"], r["steps"]), []).append(r)
    rows = []
    for (variant, target, steps), rs in groups.items():
        row = {"variant": variant, "target": target, "steps": steps, "seeds": len(rs)}
        for k in ("l0", "fvu", "delta_lm_loss", "kl", "dead_fraction"):
            v = [r[k] for r in rs]
            row[k], row[k + "_range"] = sum(v) / len(v), max(v) - min(v)
        rows.append(row)
    return rows


def markdown(sweep, records, settings):
    """The sweep table, the frontier table (one row per run, sorted by variant, L0, budget and seed),
    then each (variant, L0, budget)'s mean over seeds with the seed spread."""
    order = lambda r: (list(VARIANTS).index(r["variant"]), r["target"], r["steps"], r.get("seed", 0), r.get("lr", 0))
    pct = lambda r, k: f"{r[k]:.1%}" if r.get(k) is not None else ""
    bs = settings["batch_size"]
    budgets = ", ".join(f"{s} steps x {bs:,} tokens ({s * bs:,} tokens)" for s in settings["steps"])
    lines = [f"Width {settings['d_sae']:,}, {budgets} per SAE on `{settings['acts']}` ({settings['model']} layer "
             f"{settings['layer']} {settings['site']}, {settings['train_tokens']:,} training tokens); metrics on "
             f"{records[0]['tokens']:,} held-out tokens, LM metrics on {records[0].get('lm_tokens', 0):,} "
             f"predictions; {settings['machine']}, {settings['date']}, {settings['minutes']} min.", "",
             f"Learning-rate sweep at target L0 {settings['sweep_at']:g}, seed 0, {tokens(sweep[0], bs) if sweep else ''} "
             f"tokens (chosen: the lowest FVU among runs within {WITHIN:.0%} of the target):", "",
             "| architecture | lr | L0 | FVU | delta LM loss | dead | chosen |", "| --- | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for r in sorted(sweep, key=order):
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['delta_lm_loss']:.4f} | "
                     f"{r['dead_fraction']:.1%} | {'yes' if settings['lr'][r['variant']] == r['lr'] else ''} |")
    lines += ["", "The frontier, each architecture at its chosen learning rate; decoder and encoder match: the "
              "fraction of latents matched one-to-one across the two seeds with cosine > 0.7:", "",
              "| architecture | target | budget | seed | lr | L0 | FVU | delta LM loss | KL | CE recovered | dead "
              "| decoder match | encoder match | absorption | full absorption |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(records, key=order):
        lines.append(f"| {r['variant']} | {r['target']:g} | {tokens(r, bs)} | {r['seed']} | {r['lr']:g} | {r['l0']:.1f} | "
                     f"{r['fvu']:.4f} | {r['delta_lm_loss']:.4f} | {r['kl']:.4f} | {r['ce_loss_recovered']:.2%} | "
                     f"{r['dead_fraction']:.1%} | {pct(r, 'decoder_match')} | {pct(r, 'encoder_match')} | "
                     f"{pct(r, 'absorption_fraction')} | {pct(r, 'full_absorption_rate')} |")
    lines += ["", "Mean over seeds, with the seed spread (max - min) in brackets where there are several:", "",
              "| architecture | target | budget | seeds | L0 | FVU | delta LM loss | KL | dead |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(spreads(records), key=order):
        cell = lambda k, f: f"{r[k]:{f}}" + (f" ({r[k + '_range']:{f}})" if r["seeds"] > 1 else "")
        lines.append(f"| {r['variant']} | {r['target']:g} | {tokens(r, bs)} | {r['seeds']} | {cell('l0', '.1f')} | "
                     f"{cell('fvu', '.4f')} | {cell('delta_lm_loss', '.4f')} | {cell('kl', '.4f')} | {cell('dead_fraction', '.1%')} |")
    return "\n".join(lines) + "\n"


def plot(records, path, batch_size):
    """FVU and delta LM loss against L0: a colour per variant, a line style per budget (the largest solid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = sorted({r["steps"] for r in records}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.8 * (len(budgets) - 1)))
    for ax, metric, label in zip(axes, ("fvu", "delta_lm_loss"), ("FVU", "delta LM loss (nats)")):
        for i, variant in enumerate(VARIANTS):
            for style, steps in zip(("o-", "s--", "^:"), budgets):
                rs = [r for r in records if r["variant"] == variant and r["steps"] == steps]
                main = sorted((r for r in rs if r["seed"] == 0), key=lambda r: r["l0"])
                extra = [r for r in rs if r["seed"] != 0]
                if not main:
                    continue
                name = variant if len(budgets) == 1 else f"{variant}, {tokens(main[0], batch_size)}"
                ax.plot([r["l0"] for r in main], [r[metric] for r in main], style, color=f"C{i}", label=name)
                ax.plot([r["l0"] for r in extra], [r[metric] for r in extra], style[0], mfc="none", color=f"C{i}")
        ax.set_xscale("log")
        if all(r[metric] > 0 for r in records):      # a delta LM loss can be <= 0 on a toy model
            ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per held-out token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small" if len(budgets) > 1 else None)
    fig.suptitle("sparsity-fidelity frontier (hollow: other seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    """The sweep, the frontier, their evaluation and the seed comparison; returns (sweep, records, lr)."""
    variants, lrs = args.archs, sorted(set(args.lrs))
    # A Matryoshka variant takes the rate swept for its architecture, where that is swept too.
    inherits = {v: VARIANTS[v]["arch"] for v in variants if "matryoshka" in VARIANTS[v] and VARIANTS[v]["arch"] in variants}
    sweep_runs = [(v, args.sweep_at, 0, lr, args.steps[0]) for v in variants if v not in inherits for lr in lrs]
    sweep_folders = train_all(args.acts, args.out, sweep_runs, args.d_sae, args.device) if len(lrs) > 1 else []
    sweep = evaluate.evaluate(sweep_folders, args.acts, device=args.device, progress=False)
    for r, (variant, target, seed, lr, steps) in zip(sweep, sweep_runs):
        r.update(variant=variant, target=target, seed=seed, lr=lr, steps=steps)
    lr = best_lrs(sweep, args.sweep_at) if sweep else {v: lrs[0] for v in variants}
    lr.update({v: lr[arch] for v, arch in inherits.items()})
    seeds_at, seeds_steps = set(args.seeds_at or args.targets), set(args.seeds_steps or args.steps)
    runs = [(v, t, s, lr[v], n) for v in variants for t in args.targets for n in args.steps
            for s in range(args.seeds if t in seeds_at and n in seeds_steps else 1)]
    runs.sort(key=lambda r: (r[4], r[2], r[1] != args.sweep_at))   # per budget, smallest first: seed 0, then the others
    folders = train_all(args.acts, args.out, runs, args.d_sae, args.device)
    everything = list(dict.fromkeys(folders + sweep_folders))         # each SAE spliced into the model once
    by_folder = dict(zip(everything, evaluate.evaluate(everything, args.acts, lm=True, lm_windows=args.lm_windows,
                                                          absorption=args.absorption, device=args.device)))
    records, sweep = [by_folder[f] for f in folders], [{**by_folder[f], **s} for f, s in zip(sweep_folders, sweep)]
    for r, (variant, target, seed, lr_, steps) in zip(records, runs):
        r.update(variant=variant, target=target, seed=seed, lr=lr_, steps=steps)
    stability(records)
    for r in records + sweep:
        r.pop("firing_frequency", None)
        r.pop("absorption_by_letter", None)                      # evaluate.py --absorption prints it
    return sweep, records, lr


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--acts", required=True, type=acts.folder, help="folder written by harvest.py")
    p.add_argument("--out", required=True, type=cli.out_folder, help="parent folder for the SAEs (created)")
    p.add_argument("--results", default="results/frontier", type=cli.out_file,
                   help="prefix of the .md, .json and .png written (its folder must exist)")
    p.add_argument("--archs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--targets", nargs="+", type=cli.positive_int, default=[10, 25, 60, 150],
                   help="target L0s (default 10 25 60 150)")
    p.add_argument("--seeds", type=cli.positive_int, default=2, help="seeds at each of --seeds-at and --seeds-steps (default 2)")
    p.add_argument("--seeds-at", nargs="+", type=cli.positive_int, default=None,
                   help="the targets trained with --seeds seeds (default: every target)")
    p.add_argument("--seeds-steps", nargs="+", type=cli.positive_int, default=None,
                   help="the budgets (of --steps) trained with --seeds seeds (default: every budget)")
    p.add_argument("--lrs", nargs="+", type=cli.positive, default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                   help="learning rates of the sweep (default 3e-4 1e-3 3e-3 1e-2 3e-2; one value: no sweep)")
    p.add_argument("--sweep-at", type=cli.positive_int, default=25, help="the target L0 of the sweep (default 25)")
    p.add_argument("--d-sae", type=cli.positive_int, default=2304, help="latents (default 2,304: 4 x SmolLM2's d_in)")
    p.add_argument("--steps", nargs="+", type=cli.positive_int, default=[250],
                   help="training steps of 2,048 tokens (default 250); several train every run at each budget, "
                        "the sweep at the first")
    p.add_argument("--lm-windows", type=cli.positive_int, default=32, help="held-out windows for delta LM loss (default 32)")
    p.add_argument("--absorption", action="store_true",
                   help="also measure each SAE's feature absorption (evaluate.py --absorption) for the tables")
    p.add_argument("--device", type=cli.device, default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--machine", default=None, help="a description of the machine for the table's caption")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not set(args.seeds_at or []) <= set(args.targets):
        p.error(f"--seeds-at {' '.join(map(str, args.seeds_at))} must be among --targets {' '.join(map(str, args.targets))}")
    if not set(args.seeds_steps or []) <= set(args.steps):
        p.error(f"--seeds-steps {' '.join(map(str, args.seeds_steps))} must be among --steps {' '.join(map(str, args.steps))}")
    if max(args.targets + [args.sweep_at]) > args.d_sae:
        p.error(f"--targets and --sweep-at must not exceed the --d-sae {args.d_sae} latents; pass lower targets")
    t0 = time.perf_counter()
    try:
        sweep, records, lr = run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:     # a full disk: the SAEs written are whole, and the next run resumes
        sys.exit(f"error: writing under {args.out} failed ({e.strerror or e}); free space, then run again.")
    manifest = json.loads((Path(args.acts) / "manifest.json").read_text())
    machine = args.machine or (torch.cuda.get_device_name(args.device) if args.device != "cpu" else
                               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    settings = {"d_sae": args.d_sae, "steps": args.steps, "train_tokens": manifest["splits"]["train"]["rows"],
                "batch_size": train.RECIPES["small"]["batch_size"], "acts": args.acts,
                "model": manifest["model"], "layer": manifest["layer"], "site": manifest["site"], "machine": machine,
                "lrs": sorted(set(args.lrs)), "sweep_at": args.sweep_at, "lr": lr, "date": time.strftime("%Y-%m-%d"),
                "minutes": round((time.perf_counter() - t0) / 60, 1)}
    results, table = args.results, markdown(sweep, records, settings)
    try:
        atomic_write(f"{results}.md", lambda f: f.write(table.encode()))
        acts.write_json(f"{results}.json", {"settings": settings, "sweep": sweep, "records": records})
        plot(records, f"{results}.png", settings["batch_size"])
    except OSError as e:
        sys.exit(f"error: writing {results}.md, .json and .png failed ({e.strerror or e}); free space, then run again.")
    print(table)
    print(f"wrote {results}.md, {results}.json and {results}.png ({settings['minutes']} min)")


if __name__ == "__main__":
    main()
