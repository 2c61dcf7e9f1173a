"""Reproduce the paper's headline: the sparsity-fidelity frontier of JumpReLU against the baselines.

    python harvest.py --out runs/acts           # once (demo.sh does it too): SmolLM2 layer 6, 425k tokens
    python frontier.py --acts runs/acts --out runs/frontier --results results/frontier_cpu

Trains every architecture (JumpReLU, ReLU, Gated, TopK, BatchTopK) at each --targets L0 with the
same width, token budget and data order, plus extra seeds at one sparsity to show the noise; then
evaluates them all on held-out tokens, with delta LM loss from splicing each into the model, and
writes RESULTS.md (a markdown table), RESULTS.json and RESULTS.png (FVU and delta LM loss against
L0). A finished run is skipped, a killed one resumed, so the command can simply be run again.

How each architecture reaches a target L0 K: JumpReLU by its quadratic target-L0 penalty (the small
recipe of train.py), TopK and BatchTopK with k = K, ReLU and Gated by the PI controller on their L1
coefficient. The achieved, held-out L0 is what the table and the plot use.
"""

import json
import sys
import time
from pathlib import Path


import acts
import cli
import evaluate
import train
from baselines import ARCHITECTURES
from jumprelu import atomic_write


def run_name(arch, target, seed):
    return f"{arch}_l0_{target:g}_seed{seed}"


def train_all(acts_dir, out, archs, targets, seeds_at, seeds, d_sae, steps):
    """Train (or resume, or skip) every run; return the SAE folders in a fixed order."""
    runs = [(a, t, 0) for a in archs for t in targets] + [(a, seeds_at, s) for a in archs for s in range(1, seeds)]
    folders = []
    for i, (arch, target, seed) in enumerate(runs):
        folder = Path(out) / run_name(arch, target, seed)
        folders.append(folder)
        if (folder / "config.json").is_file():
            print(f"[{i + 1}/{len(runs)}] {folder.name}: done already")
            continue
        resume = (folder / "checkpoint.safetensors").is_file()
        t0 = time.perf_counter()
        r = train.train(acts_dir, folder, arch=arch, d_sae=d_sae, steps=steps, target_l0=target, seed=seed,
                        resume=resume, quiet=True)
        print(f"[{i + 1}/{len(runs)}] {folder.name}: held-out L0 {r['heldout_l0']:.1f}, FVU {r['heldout_fvu']:.4f}, "
              f"dead {r['dead_fraction']:.1%} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return folders


def markdown(records, settings):
    """The results table, one row per run, sorted by architecture and L0."""
    lines = [f"Width {settings['d_sae']:,}, {settings['steps']} steps x {settings['batch_size']:,} tokens "
             f"({settings['steps'] * settings['batch_size']:,} tokens) per SAE on `{settings['acts']}` "
             f"({settings['model']} layer {settings['layer']} {settings['site']}); metrics on "
             f"{records[0]['tokens']:,} held-out tokens, LM metrics on {records[0].get('lm_tokens', 0):,} "
             f"predictions; {settings['machine']}, {settings['date']}.", "",
             "| architecture | target | seed | L0 | FVU | delta LM loss | KL | CE recovered | dead |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(records, key=lambda r: (list(ARCHITECTURES).index(r["architecture"]), r["target"], r["seed"])):
        lines.append(f"| {r['architecture']} | {r['target']:g} | {r['seed']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
                     f"{r['delta_lm_loss']:.4f} | {r['kl']:.4f} | {r['ce_loss_recovered']:.2%} | {r['dead_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in zip(axes, ("fvu", "delta_lm_loss"), ("FVU", "delta LM loss (nats)")):
        for i, arch in enumerate(ARCHITECTURES):
            main = sorted((r for r in records if r["architecture"] == arch and r["seed"] == 0), key=lambda r: r["l0"])
            extra = [r for r in records if r["architecture"] == arch and r["seed"] != 0]
            if not main:
                continue
            line, = ax.plot([r["l0"] for r in main], [r[metric] for r in main], "o-", color=f"C{i}", label=arch)
            ax.plot([r["l0"] for r in extra], [r[metric] for r in extra], "o", mfc="none", color=line.get_color())
        ax.set_xscale("log")
        if all(r[metric] > 0 for r in records):      # a delta LM loss can be <= 0 on a toy model
            ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per held-out token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("sparsity-fidelity frontier (hollow: other seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--acts", required=True, type=acts.folder, help="folder written by harvest.py")
    p.add_argument("--out", required=True, type=cli.out_folder, help="parent folder for the SAEs (created)")
    p.add_argument("--results", default="results/frontier", type=cli.out_file,
                   help="prefix of the .md, .json and .png written (its folder must exist)")
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument("--targets", nargs="+", type=cli.positive_int, default=[10, 25, 60, 150],
                   help="target L0s (default 10 25 60 150)")
    p.add_argument("--seeds-at", type=cli.positive_int, default=25, help="the target trained with extra seeds (default 25)")
    p.add_argument("--seeds", type=cli.positive_int, default=2, help="seeds at --seeds-at (default 2)")
    p.add_argument("--d-sae", type=cli.positive_int, default=2304, help="latents (default 2,304: 4 x SmolLM2's d_in)")
    p.add_argument("--steps", type=cli.positive_int, default=250, help="training steps of 2,048 tokens (default 250)")
    p.add_argument("--lm-windows", type=cli.positive_int, default=32, help="held-out windows for delta LM loss (default 32)")
    p.add_argument("--machine", default=None, help="a description of the machine for the table's caption")
    args = p.parse_args(argv)
    if args.seeds_at not in args.targets:
        p.error(f"--seeds-at {args.seeds_at} must be one of --targets {' '.join(map(str, args.targets))}")
    if max(args.targets) > args.d_sae:
        p.error(f"--targets {max(args.targets)} is more than the --d-sae {args.d_sae} latents; pass lower targets")
    t0 = time.perf_counter()
    try:
        folders = train_all(args.acts, args.out, args.archs, args.targets, args.seeds_at, args.seeds,
                            args.d_sae, args.steps)
        records = evaluate.evaluate(folders, args.acts, lm=True, lm_windows=args.lm_windows)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:     # a full disk: the SAEs written are whole, and the next run resumes
        sys.exit(f"error: writing under {args.out} failed ({e.strerror or e}); free space, then run again.")
    manifest = json.loads((Path(args.acts) / "manifest.json").read_text())
    for folder, r in zip(folders, records):
        meta = json.loads((folder / "config.json").read_text())
        r.update(target=meta["target_l0"], seed=meta["seed"])
        r.pop("firing_frequency")
    import platform
    import torch
    machine = args.machine or (torch.cuda.get_device_name() if torch.cuda.is_available() else
                               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    settings = {"d_sae": args.d_sae, "steps": args.steps, "batch_size": train.SMALL["batch_size"], "acts": args.acts,
                "model": manifest["model"], "layer": manifest["layer"], "site": manifest["site"], "machine": machine,
                "date": time.strftime("%Y-%m-%d"), "minutes": round((time.perf_counter() - t0) / 60, 1)}
    results, table = args.results, markdown(records, settings)
    try:
        atomic_write(f"{results}.md", lambda f: f.write(table.encode()))
        acts.write_json(f"{results}.json", {"settings": settings, "records": records})
        plot(records, f"{results}.png")
    except OSError as e:
        sys.exit(f"error: writing {results}.md, .json and .png failed ({e.strerror or e}); free space, then run again.")
    print(table)
    print(f"wrote {results}.md, {results}.json and {results}.png ({settings['minutes']} min)")


if __name__ == "__main__":
    main()
