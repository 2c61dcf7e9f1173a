"""Train a JumpReLU SAE (or a baseline: ReLU, Gated, TopK, BatchTopK) on harvested activations.

    python train.py --acts runs/acts --out runs/sae --target-l0 32            # small-budget recipe
    python train.py --acts runs/acts --out runs/sweep --target-l0 16 32 64    # a sweep: runs/sweep/jumprelu_l0_16 ...
    python train.py --acts runs/acts --out runs/topk --arch topk --target-l0 32   # baselines: --arch
    python train.py --acts runs/acts --out runs/sae --l0-coefficient 1e-3 --steps 200000 --recipe paper
    python train.py --acts runs/acts --out runs/sae --target-l0 32 --matryoshka 256 1024  # Matryoshka
    python train.py --acts runs/acts --out runs/sae --resume                  # carry on a killed run
    torchrun --nproc-per-node 8 train.py --acts runs/acts --out runs/sae --target-l0 32   # 8 GPUs, data parallel

Inputs are multiplied by one scalar so that E||x||^2 = 1 over the training split (docs/maths.md
section 3.1, estimated once from a sample); the saved SAE has it folded in and takes raw
activations. Sparsity is set by a fixed L0 coefficient (lambda), or by --target-l0 K, which holds
the L0 at K: with a quadratic penalty around K (the small recipe) or a controller on lambda
(--sparsity l0). The baselines (docs/maths.md section 4, baselines.py) take the same --target-l0:
k itself for TopK and BatchTopK, the PI controller on the L1 coefficient for ReLU and Gated (or a
fixed --l0-coefficient, which is then their L1 coefficient). They share the optimiser, schedule,
batch, b_dec and orthogonal initialisation; the JumpReLU-only parts (thresholds, bandwidth,
dead-threshold pull) not. Each setting is defined once, in train.py's SETTINGS with both recipes'
values; --help lists them all.

Writes to --out: config.json and sae.safetensors (the SAE), log.jsonl (one record per --log-every
steps) and checkpoint.safetensors (weights, Adam state, step, lambda; written atomically).

Under torchrun (WORLD_SIZE > 1) training is data parallel: each rank reads its slice of every global
batch of --batch-size rows, the gradients and the batch L0 are averaged over the ranks, and rank 0
alone writes the log, the checkpoints and the SAE; the result is that of one process on the same
batches, up to float rounding. BatchTopK, which ranks the whole batch, trains in one process.
"""

import argparse
import functools
import json
import math
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

import acts
import anthropic
import cli
import matryoshka
import penalties
import sae_folder
from baselines import ARCHITECTURES, make_sae
from sae_folder import atomic_write

# --- The settings: each defined once, with the two recipes' values ------------------------------


class Setting(NamedTuple):
    paper: object        # the paper's recipe: Gemma Scope's, built for billions of tokens (docs/maths.md section 3.1)
    small: object        # ours for about a million tokens, minutes on a CPU (section 3.2; measured in docs/recipe.md)
    help: str
    option: dict = None  # argparse's type or choices for --<name>; None: the recipe's alone


SETTINGS = {
    # What is trained, and for how long.
    "arch": Setting("jumprelu", "jumprelu", "jumprelu, or a baseline of docs/maths.md section 4",
                    dict(choices=list(ARCHITECTURES))),
    "d_sae": Setting(None, None, "number of latents (default 8 x d_in)", dict(type=cli.positive_int)),
    "steps": Setting(600, 600, "training steps", dict(type=cli.positive_int)),
    "sparsity": Setting("l0", "target_batch",
                        "JumpReLU's sparsity term: the paper's lambda*L0 (l0), lambda (2/K)(L0-K)^2 on the batch mean "
                        "(target_batch) or per row (target_row, Gemma Scope 2), both with --target-l0 K, or Anthropic's "
                        "JumpReLU (tanh: its tanh penalty, pre-activation loss, bandwidth, estimator and free decoder "
                        "norms); l0 and tanh take --l0-coefficient LAMBDA, or --target-l0 K for a controller on lambda",
                        dict(choices=("l0", "target_batch", "target_row", "tanh"))),
    "target_l0_coefficient": Setting(None, 5e-3, "lambda of the target_batch and target_row penalties"),
    "matryoshka": Setting(None, None, "Matryoshka training of JumpReLU or BatchTopK: nested prefix sizes of the "
                          "latents, such as 256 1024 4096; the reconstruction error becomes the mean of those of the "
                          "prefixes, each decoded alone, and the dead pull is off (docs/maths.md section 3.3; d_sae is "
                          "added last where missing)",
                          dict(type=cli.positive_int, nargs="+", metavar="M")),
    # Adam and its schedules.
    "lr": Setting(7e-5, 1e-3, "Adam's learning rate", dict(type=cli.positive)),
    "betas": Setting((0.0, 0.999), (0.9, 0.999), "Adam's betas"),
    "batch_size": Setting(4096, 2048, "rows a step (the global batch under torchrun)", dict(type=cli.positive_int)),
    "lr_warmup_steps": Setting(1000, 50, "steps of the cosine learning-rate warm-up from 0.1 lr", dict(type=cli.count)),
    "lr_decay_fraction": Setting(0.0, 0.2, "the last fraction of the steps, over which the learning rate decays "
                                 "linearly to 0", dict(type=cli.fraction)),
    "l0_warmup_steps": Setting(10_000, 0, "steps of lambda's linear warm-up from 0", dict(type=cli.count)),
    # JumpReLU's thresholds, and the initialisation from a sample of the data.
    "bandwidth": Setting(0.001, "auto", "the kernel width epsilon, in the units of the training inputs (scaled so "
                         "that E||x||^2 = 1) and used as given under every --sparsity (auto: 0.3 x the median "
                         "pre-activation std, the paper's 0.001 being about 4% of it; with --sparsity tanh the default "
                         "is Anthropic's 2.0 on inputs of norm sqrt(d_in), converted to these units)",
                         dict(type=cli.positive)),
    "threshold_init": Setting(0.001, "quantile", "each theta at the start (quantile: where its latent fires on "
                              "K/d_sae of the sample, so L0 starts at the target and no latent starts dead)"),
    "threshold_lr_scale": Setting(1.0, 20.0, "the log-thresholds' learning rate over lr (20: they move ~2% a step, "
                                  "not ~0.1%)", dict(type=cli.positive)),
    "b_dec_init": Setting("zeros", "mean", "b_dec at the start: zeros or the sample's mean"),
    "orthogonal_init": Setting(0, 2, "the encoder and decoder start orthogonal to the sample's top N singular "
                               "directions (the attention-sink direction and the mean)"),
    "dead_threshold_pull": Setting(0.0, 0.01, "a dead latent's log-threshold is pulled down at this rate until it fires"),
    "dead_window_tokens": Setting(2**15, 2**15, "a JumpReLU latent that has not fired in this many tokens is dead "
                                  "(TopK's window: dead_steps)"),
    # The run.
    "seed": Setting(0, 0, "seed of the initialisation and the batch order", dict(type=cli.count)),
    "log_every": Setting(25, 25, "steps between log records", dict(type=cli.positive_int)),
    "checkpoint_every": Setting(100, 100, "steps between checkpoints", dict(type=cli.positive_int)),
    "device": Setting(None, None, "cuda or cpu (default: cuda when present)", dict(type=cli.device)),
    "autocast": Setting(None, None, "train under bf16 autocast (default: on CUDA)"),
    "path": Setting("auto", "auto", "JumpReLU's loss path: dense, sparse (only the active and in-window latents' "
                    "rows), or auto (sparse once L0 is a small fraction of --d-sae); both give the same loss and "
                    "gradients", dict(choices=("auto", "dense", "sparse"))),
    "compile": Setting(None, None, "run the loss through torch.compile (default: JumpReLU's on CUDA, 1.5-2x the eager "
                       "speed there; see BENCHMARKS.md)", dict(action=argparse.BooleanOptionalAction)),
    "buffer_rows": Setting(acts.BUFFER_ROWS, acts.BUFFER_ROWS, "rows of the shuffle buffer the batches come from"),
}
RECIPES = {recipe: {name: getattr(s, recipe) for name, s in SETTINGS.items()} for recipe in ("paper", "small")}
TOPK = ("topk", "batchtopk")
CHECKPOINT = "checkpoint.safetensors"   # in --out: weights, Adam state, step and the run's settings
AUTO_BANDWIDTH = 0.3             # bandwidth "auto": this fraction of the median over latents of the pre-activation std
GAO_WINDOW_TOKENS = 10_000_000   # Gao et al.'s dead window, for runs of billions of tokens
DEAD_LOG_TOKENS = 2**20          # the log's dead fraction: latents that have not fired in this many tokens
CALIBRATION_BATCHES = 32         # BatchTopK's threshold: the mean of this many batches' smallest kept activation


# --- Training: train() first, then its helpers in the order it calls them --------------------------


def train(acts_dir, out, hp=None, *, resume=False, quiet=False, dtype=torch.float32, **given):
    """Train an SAE on the harvested folder `acts_dir` and write it to the folder `out`. Returns the
    last log record (on rank 0; {} on the other ranks under torchrun).

    `hp`: the run's settings, from `settings`; without it, `given` names them as `settings` takes
    them: train("runs/acts", "runs/sae", target_l0=32, steps=200). `resume`: carry on from
    out/checkpoint.safetensors, with the settings it records (run_settings); with no checkpoint
    there, the run starts. `dtype`: of the SAE and the batches during training (float64 for checks
    against a reference); the saved SAE is float32."""
    ckpt = Path(out) / CHECKPOINT
    resume = resume and ckpt.is_file()             # --resume without a checkpoint starts the run
    hp = hp or run_settings(acts_dir, ckpt, resume, **given)
    rank, local_rank, world, device = processes(hp["device"])
    device_type, B, steps = torch.device(device).type, hp["batch_size"], hp["steps"]   # B: the global batch
    autocast = device_type == "cuda" if hp["autocast"] is None else hp["autocast"]
    manifest, shards, scale, sample_ND, x_eval_BD = open_data(acts_dir, B, hp["seed"], device, dtype, verify=local_rank == 0)
    recorded = hp                                  # the settings as given, which the checkpoint keeps for --resume
    if hp["sparsity"] == "tanh":                   # Anthropic's constants, from their units to ours
        hp = anthropic.in_our_units(hp, sample_ND)
    own_group = join_group(world, device_type)
    torch.manual_seed(hp["seed"])
    sae = build(hp, manifest["d_in"], sample_ND, device, dtype)
    scale = broadcast_(sae, scale, device) if world > 1 else scale
    opt = make_optimizer(sae, hp, device_type)
    controller = make_controller(hp)
    losses = loss_functions(sae, hp, world, device_type)
    fired_at = torch.zeros(hp["d_sae"], dtype=torch.long, device=device)      # steps done when each latent last fired
    state = {"step": 0, "l0_coefficient": controller.value if controller else hp["l0_coefficient"]}
    if resume:
        state = resume_from(ckpt, sae, opt, fired_at, controller, hp)
        scale = state["scale"]
        if rank == 0 and not quiet:
            print(f"resuming {out} at step {state['step']} of {steps}")
    if rank == 0:
        start_log(Path(out) / "log.jsonl", resume, state["step"])
    stream = acts.batches(shards, B, hp["seed"], start_step=state["step"], buffer_rows=hp["buffer_rows"], rank=rank,
                          world=world)
    l0_coefficient, l0, record = state["l0_coefficient"], state.get("last_l0", hp["d_sae"]), {}
    with Log(Path(out) / "log.jsonl", sae, x_eval_BD, fired_at, batch_size=B, start=state["step"], steps=steps,
             world=world, rank=rank, autocast=autocast, quiet=quiet) as log:
        for step in range(state["step"], steps):
            x_BD = next_batch(stream, scale, device, dtype, ckpt)
            l0_coefficient = l0_coefficient_at(step, controller.value if controller else hp["l0_coefficient"],
                                               hp["l0_warmup_steps"])
            lr = set_lr(opt, lr_at(step, steps, hp["lr"], hp["lr_warmup_steps"], hp["lr_decay_fraction"]))
            path = choose_path(losses["path"], l0, hp["d_sae"], device_type, autocast, losses["compiled"])
            try:
                result = train_step(sae, opt, losses[path], x_BD, l0_coefficient, fired_at, step,
                                    dead_steps=dead_steps(hp), world=world, autocast=autocast)
            except FloatingPointError as e:
                raise ValueError(f"{e}; {last_good(ckpt)}; lower --lr and --resume.") from None
            l0 = result["l0"].item()
            if controller:
                controller.update(l0)
            log.bar.update(1)
            if (step + 1) % hp["log_every"] == 0 or step + 1 == steps:
                record = log.write(step + 1, result, l0_coefficient, lr, path)
            if (step + 1) % hp["checkpoint_every"] == 0 or step + 1 == steps:
                state = {"step": step + 1, "scale": scale, "bandwidth": getattr(sae, "bandwidth", None),
                         "arch": hp["arch"], "d_sae": hp["d_sae"], "last_l0": l0,
                         "l0_coefficient": controller.value if controller else hp["l0_coefficient"],
                         "controller": controller.state() if controller else None, "recipe": hp["recipe"], "hp": recorded,
                         "seed": hp["seed"]}
                checkpoint(ckpt, sae, opt, fired_at, state, rank, world)
        if rank == 0:
            batches = (next_batch(stream, scale, device, dtype, ckpt) for _ in range(CALIBRATION_BATCHES))
            record = finish(out, sae, scale, log, record, batches, {
                **{k: manifest.get(k) for k in ("model", "gguf_file", "layer", "site", "hook", "context", "bos", "separator")},
                "acts": str(acts_dir), "recipe": hp["recipe"], "steps": steps, "tokens": steps * B, "seed": hp["seed"],
                "lr": hp["lr"], "target_l0": hp["target_l0"],
                "l0_coefficient": None if hp["arch"] in TOPK else l0_coefficient,
                "sparsity": hp["sparsity"] if hp["arch"] == "jumprelu" else None,
                **({"matryoshka": hp["matryoshka"]} if hp["matryoshka"] else {})})
    leave_group(own_group)
    return record


def settings(acts_dir, recipe="small", target_l0=None, l0_coefficient=None, **given):
    """The run's settings: the recipe's (SETTINGS), Anthropic's constants under sparsity "tanh" (in
    their units, which train() converts; the bandwidth as THEIR_BANDWIDTH), then those `given` (None:
    the recipe's; a given bandwidth is in our units, under every sparsity), with the sparsity resolved
    and everything checked (a one-sentence ValueError for what cannot train). d_sae defaults to 8 x
    the folder's d_in.

    The sparsity: "l0" is the paper's lambda * L0 and "tanh" Anthropic's penalty, lambda fixed or,
    with a target K, set by the PI controller; "target_row" and "target_batch" push L0 towards K
    with a fixed lambda (target_l0_coefficient unless given). A baseline's lambda is its L1
    coefficient; TopK's and BatchTopK's k is the target."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown settings {unknown}; the settings are those of train.SETTINGS.")
    given = {k: v for k, v in given.items() if v is not None}
    tanh = {**anthropic.DEFAULTS, "bandwidth": anthropic.THEIR_BANDWIDTH} if given.get("sparsity") == "tanh" else {}
    hp = {**RECIPES[recipe], **tanh, **given,
          "recipe": recipe, "target_l0": target_l0, "l0_coefficient": l0_coefficient}
    hp["d_sae"] = hp["d_sae"] or 8 * acts.read_manifest(acts_dir)["d_in"]
    check_settings(hp, given, int(os.environ.get("WORLD_SIZE", 1)))
    if hp["matryoshka"]:
        hp["matryoshka"] = matryoshka.prefixes(hp["matryoshka"], hp["d_sae"])
        # Matryoshka keeps its later latents rare by design; the dead pull, made to revive latents
        # the estimators cannot reach, fought that: L0 36 for a target of 25 at 512k tokens, 28.6
        # without it (docs/maths.md section 3.3).
        hp["dead_threshold_pull"] = given.get("dead_threshold_pull", 0.0)
    if hp["arch"] != "jumprelu" or (not target_l0 and hp["sparsity"] != "tanh"):
        hp["sparsity"] = "l0"            # a fixed lambda (the paper's penalty), or a baseline's L1 term
    if hp["sparsity"] in ("target_row", "target_batch"):
        hp["l0_coefficient"] = l0_coefficient or hp["target_l0_coefficient"]
    return hp


RESUME_MAY_CHANGE = ("steps", "device", "autocast", "path", "compile", "log_every", "checkpoint_every", "buffer_rows")


def run_settings(acts_dir, ckpt, resume, **given):
    """The run's settings: those of `settings(acts_dir, **given)` for a new run. Resuming from the
    checkpoint `ckpt`, the settings the run was made with, so that it goes on to its own end; a given
    setting that contradicts them is refused, except how to run (RESUME_MAY_CHANGE: a larger --steps
    trains on)."""
    given = {k: v for k, v in given.items() if v is not None}
    hp = read_checkpoint(ckpt, tensors=False)[0].get("hp") if resume and ckpt.is_file() else None
    if hp is None:                       # a new run, or a checkpoint from before they kept their settings
        return settings(acts_dir, **given)
    # A setting added since the checkpoint was made takes the recipe's value; JSON made the tuple a list.
    hp = {**RECIPES[hp["recipe"]], **hp, "betas": tuple(hp["betas"])}
    if given.get("matryoshka"):          # as recorded: with d_sae last
        given["matryoshka"] = matryoshka.prefixes(given["matryoshka"], hp["d_sae"])
    for name, value in given.items():
        if name not in RESUME_MAY_CHANGE and value != hp.get(name):
            raise ValueError(f"--{name.replace('_', '-')} {value} contradicts the {hp.get(name)} that {ckpt} was made "
                             "with; leave it out to carry on that run, or pass another --out.")
    return {**hp, **given}


def check_settings(hp, given, world):
    """One-sentence errors for settings that cannot train; `given`: the ones the caller set. With
    --recipe paper, lambda is fixed and warmed up (--l0-coefficient), or k is --target-l0 for TopK."""
    arch, target_l0, sparsity = hp["arch"], hp["target_l0"], given.get("sparsity")
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHITECTURES)}, not {arch!r}.")
    if world > 1 and arch == "batchtopk":
        raise ValueError("--arch batchtopk ranks the latents of the whole batch, which data parallel training splits "
                         "over the ranks; train it in one process (python train.py, without torchrun).")
    if hp["path"] not in ("auto", "dense", "sparse"):
        raise ValueError(f"--path must be auto, dense or sparse, not {hp['path']!r}.")
    if hp["path"] == "sparse" and arch != "jumprelu":
        raise ValueError(f"--path sparse is JumpReLU's; --arch {arch} trains on the dense path (leave --path at auto).")
    if hp["matryoshka"] and arch not in ("jumprelu", "batchtopk"):
        raise ValueError(f"--matryoshka trains JumpReLU and BatchTopK SAEs; drop it for --arch {arch}.")
    if hp["path"] == "sparse" and hp["matryoshka"]:
        raise ValueError("--matryoshka trains on the dense path (every prefix decodes its latents); leave --path at auto.")
    if hp["path"] == "sparse" and sparsity == "tanh":
        raise ValueError("--sparsity tanh trains on the dense path (its pre-activation loss needs every pre-activation); "
                         "leave --path at auto.")
    if hp["recipe"] == "paper" and arch not in TOPK and (target_l0 is not None or hp["l0_coefficient"] is None):
        raise ValueError("--recipe paper fixes lambda and warms it up over 10,000 steps: pass --l0-coefficient LAMBDA "
                         "(--target-l0 K is the small recipe's, or k with --arch topk or batchtopk).")
    if target_l0 is None and hp["l0_coefficient"] is None:
        raise ValueError("set the sparsity with --target-l0 K or --l0-coefficient LAMBDA.")
    for name in ("sparsity", "bandwidth", "threshold_lr_scale"):
        if name in given and arch != "jumprelu":
            raise ValueError(f"--{name.replace('_', '-')} is JumpReLU's; drop it for --arch {arch}.")
    if sparsity in ("target_batch", "target_row") and target_l0 is None:
        raise ValueError(f"--sparsity {sparsity} holds the L0 at --target-l0 K; pass it instead of --l0-coefficient, "
                         "or drop --sparsity.")
    if arch in TOPK and (target_l0 is None or target_l0 != int(target_l0) or target_l0 < 1):
        raise ValueError(f"--arch {arch} needs --target-l0 K, a positive whole number (its k), not {target_l0}.")
    if hp["batch_size"] % world:
        raise ValueError(f"--batch-size {hp['batch_size']} cannot be split evenly over {world} ranks; pass a multiple "
                         f"of {world}.")
    if hp["d_sae"] < max(1, target_l0 or 0):
        raise ValueError(f"--d-sae {hp['d_sae']} is fewer latents than an L0 of {max(1, target_l0 or 0):g} needs; pass a "
                         "larger --d-sae or a lower --target-l0.")


# --- Set-up: the data, the model, its optimiser and its loss ----------------------------------------


def open_data(acts_dir, batch_size, seed, device, dtype=torch.float32, verify=True):
    """The training shards; the input scale, from a sample of 16,384 training rows; that sample and a
    held-out batch for the log, both scaled, in `dtype`. `verify` checks the shards' sha256 (one rank a
    machine)."""
    manifest, shards = acts.open_split(acts_dir, "train", verify=verify)
    _, heldout = acts.open_split(acts_dir, "heldout", verify=verify)
    rows = sum(len(a) for a, _ in shards)
    if rows < batch_size:
        raise ValueError(f"{acts_dir}'s training split has {rows:,} rows, fewer than one batch of {batch_size:,}; "
                         "lower --batch-size or harvest more --tokens.")
    sample_ND = acts.sample_rows(shards, 16_384, seed)
    if not torch.isfinite(sample_ND).all():
        raise ValueError(f"{acts_dir} holds NaN or Inf activations; harvest it again.")
    scale = input_scale(sample_ND)
    x_eval_BD = acts.sample_rows(heldout, batch_size, seed).to(device, dtype) * scale
    return manifest, shards, scale, sample_ND[:4096].to(device, dtype) * scale, x_eval_BD


def input_scale(x_ND):
    """docs/maths.md section 3.1: the scalar s with E||s x||^2 = 1 over the sample."""
    return 1.0 / math.sqrt(x_ND.double().pow(2).sum(1).mean().item())


def build(hp, d_in, sample_ND, device, dtype=torch.float32):
    """A new SAE: docs/maths.md section 3.1's initialisation (the recipe's bandwidth and thresholds for
    JumpReLU, Anthropic's SAE under sparsity "tanh", k = target_l0 for TopK and BatchTopK), then
    init_from_data on the scaled sample."""
    kw, arch = dict(device=device, dtype=dtype), hp["arch"]
    if arch == "jumprelu":
        kw.update(bandwidth=hp["bandwidth"] if hp["bandwidth"] != "auto" else 0.001,
                  threshold_init=hp["threshold_init"] if hp["threshold_init"] != "quantile" else 0.001)
    if hp["sparsity"] == "tanh":
        sae = anthropic.AnthropicJumpReLUSAE(d_in, hp["d_sae"], **kw)
    else:
        sae = make_sae(arch, d_in, hp["d_sae"], k=int(hp["target_l0"]) if arch in TOPK else None, **kw)
    init_from_data(sae, sample_ND, hp["target_l0"] or 32, hp)
    return sae


@torch.no_grad()
def init_from_data(sae, x_ND, target_l0, hp):
    """The data-driven parts of the small recipe's initialisation, on a sample x_ND (scaled)."""
    if hp["orthogonal_init"]:
        # The residual stream has a "massive activation" direction: attention-sink tokens put 99.7%
        # of their energy (norms 500-1,000 against ~100) along one direction. Random encoder
        # directions all overlap with it, so at initialisation each sink token fired ~700 latents
        # (19 on other tokens) and FVU started at 5.4. Starting the tied encoder and decoder
        # orthogonal to the sample's top singular directions (the sink direction and the mean,
        # 2 here) gives sink tokens 0.2 latents, others 33, FVU 0.96 (b_dec = mean); training
        # turns latents towards those directions where that helps.
        top_KD = torch.linalg.svd(x_ND, full_matrices=False).Vh[:hp["orthogonal_init"]]
        W_dec_FD = sae.W_dec - (sae.W_dec @ top_KD.T) @ top_KD
        sae.W_dec.copy_(W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    if sae.architecture == "jumprelu":
        pre_NF = sae.pre_acts(x_ND)
        if hp["bandwidth"] == "auto":
            sae.bandwidth = AUTO_BANDWIDTH * pre_NF.std(0).median().item()
        if hp["threshold_init"] == "quantile":
            # Each latent's threshold at the quantile of its pre-activations that makes it fire on
            # target_l0 / d_sae of the sample: L0 starts at the target and no latent starts dead.
            q = 1.0 - min(0.5, target_l0 / sae.d_sae)
            theta_F = torch.quantile(pre_NF.float(), q, dim=0).clamp_min(sae.bandwidth)
            sae.log_threshold.copy_(theta_F.log())
    if hp["b_dec_init"] == "mean":
        sae.b_dec.copy_(x_ND.mean(0))


def make_optimizer(sae, hp, device_type):
    """Adam with the recipe's betas, eps 1e-8, fused on CUDA; JumpReLU's log-thresholds in a group of
    their own whose learning rate is threshold_lr_scale times the others' (set_lr sets each step's)."""
    thresholds = [sae.log_threshold] if sae.architecture == "jumprelu" else []
    others = [p for p in sae.parameters() if all(p is not t for t in thresholds)]
    return torch.optim.Adam([{"params": others, "lr_scale": 1.0},
                             {"params": thresholds, "lr_scale": hp["threshold_lr_scale"]}],
                            lr=hp["lr"], betas=hp["betas"], eps=1e-8, fused=device_type == "cuda")


class TargetL0:
    """A PI controller on log(lambda) that settles the running L0 at `target`.

    error = clip((l0 - K) / K, -1, 1); integral += ki * error; lambda = exp(integral + kp * error).
    The integral removes steady-state error. The proportional term matters as much: under Adam
    the thresholds rise at a fixed rate once the L0 term dominates, so a pure integral controller
    keeps raising lambda while L0 is already falling, and then undershoots (measured: L0 54, then
    15, for a target of 32). With kp the excess disappears as soon as the error does.
    """

    def __init__(self, target, l0_coefficient=1e-3, ki=0.05, kp=1.0):
        self.target, self.ki, self.kp = float(target), ki, kp
        self.integral, self.value = math.log(l0_coefficient), float(l0_coefficient)

    def update(self, l0):
        error = max(-1.0, min(1.0, (l0 - self.target) / self.target))
        self.integral += self.ki * error
        self.value = math.exp(self.integral + self.kp * error)
        return self.value

    def state(self):
        return {"integral": self.integral, "value": self.value}

    def load(self, state):
        self.integral, self.value = state["integral"], state["value"]


def make_controller(hp):
    """The PI controller on lambda where a target L0 sets it (the "l0" and "tanh" sparsities, and ReLU's and
    Gated's L1 coefficient), starting from the given lambda or 1e-3; None where k or a fixed lambda rules."""
    if hp["target_l0"] and hp["sparsity"] in ("l0", "tanh") and hp["arch"] not in TOPK:
        return TargetL0(hp["target_l0"], hp["l0_coefficient"] or 1e-3)
    return None


def loss_functions(sae, hp, world, device_type):
    """The loss as loss(x_BD, l0_coefficient, dead_F) on each path, with the recipe's options bound:
    {"dense", "sparse", "path" (the setting: sparse and auto are JumpReLU's own sparsities'),
    "compiled"}. Compiled (by default JumpReLU's on CUDA, 1.5-2x the eager speed there; on a CPU it
    gained 2-10% for a minute of compiling; TopK's AuxK recompiles each step), the dense path fuses
    its elementwise passes; the sparse path stays eager: its kept entries change in number every
    step, which recompiled it step after step on an H100."""
    compiled = device_type == "cuda" and hp["arch"] == "jumprelu" if hp["compile"] is None else hp["compile"]
    batch_mean = functools.partial(global_mean, world=world) if world > 1 else torch.mean
    if hp["sparsity"] == "tanh":
        loss, options = type(sae).loss, {"tanh_scale": hp["tanh_scale"], "pre_act_coefficient": hp["pre_act_coefficient"]}
    elif hp["arch"] == "jumprelu":
        penalty = {"l0": penalties.paper, "target_row": penalties.target_row(hp["target_l0"]),
                   "target_batch": penalties.target_batch(hp["target_l0"], batch_mean)}[hp["sparsity"]]
        loss = penalties.loss
        options = {"penalty": penalty, "dead_pull": hp["dead_threshold_pull"]}
    else:
        loss, options = type(sae).loss, {"batch_mean": batch_mean} if hp["arch"] == "topk" and world > 1 else {}
    if hp["matryoshka"]:
        loss = matryoshka.loss(loss, hp["matryoshka"])
    path = hp["path"] if loss is penalties.loss else "dense"
    return {"dense": make_loss(loss, sae, compiled, **options), "compiled": compiled, "path": path,
            "sparse": make_loss(loss, sae, False, sparse=True, **options) if loss is penalties.loss else None}


def make_loss(loss, sae, compiled, **options):
    """loss(sae, x_BD, l0_coefficient, dead_F, **options) as a function of the last three, through
    torch.compile on request."""
    if compiled:
        torch._dynamo.reset()    # what an earlier compile in this process cached tripped dynamo (torch 2.13)
        loss = torch.compile(loss)
    return functools.partial(loss, sae, **options)


def resume_from(ckpt, sae, opt, fired_at, controller, hp):
    """Restore a killed run from its checkpoint (see load_checkpoint); returns the checkpoint's state."""
    state = load_checkpoint(ckpt, sae, opt, fired_at)
    arch, d_sae = hp["arch"], hp["d_sae"]
    if state.get("arch", "jumprelu") != arch or state.get("d_sae") not in (None, d_sae):
        raise ValueError(f"{ckpt} holds a {state.get('arch', 'jumprelu')} SAE of width {state.get('d_sae')}, "
                         f"not this --arch {arch} of width {d_sae}; pass the same settings or another --out.")
    if state["step"] >= hp["steps"]:
        raise ValueError(f"{ckpt} is already at step {state['step']}; pass a larger --steps to train on.")
    if arch == "jumprelu":
        sae.bandwidth = state["bandwidth"]
    if controller:
        controller.load(state["controller"])
    return state


def read_checkpoint(path, tensors=True):
    """A checkpoint's JSON state and its tensors (None with tensors=False); a one-sentence ValueError
    for a file that is damaged."""
    try:
        with safe_open(str(path), "pt") as f:
            state = json.loads(f.metadata()["state"])
            assert isinstance(state, dict) and isinstance(state.get("step"), int)
            return state, {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except Exception as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}); delete it to start the run afresh.") from None


def load_checkpoint(path, sae, opt, fired_at):
    """Restore a checkpoint into sae, opt and fired_at; returns its JSON state. One-sentence
    ValueError for a damaged file, or one whose tensors are another SAE's (another width, d_in or
    architecture), naming the first that differs; nothing is restored then."""
    state, tensors = read_checkpoint(path)
    expected = {f"param.{n}": p.shape for n, p in sae.named_parameters()}
    expected.update({f"buffer.{n}": b.shape for n, b in sae.named_buffers()}, fired_at=fired_at.shape)
    expected["rng.torch"] = torch.get_rng_state().shape
    differ = [f"{k} is {list(tensors[k].shape) if k in tensors else 'missing'}, not {list(shape)}"
              for k, shape in expected.items() if k not in tensors or tensors[k].shape != shape]
    try:
        adam = adam_state_dict(opt, sae, tensors)
    except (AssertionError, KeyError):
        differ.append("its Adam moments are of other shapes")
    if differ:
        raise ValueError(f"{path} holds another SAE ({differ[0]}); resume with the --acts and settings it was made "
                         "with, or pass another --out.")
    with torch.no_grad():
        for n, b in sae.named_buffers():
            b.copy_(tensors[f"buffer.{n}"])
        for n, p in sae.named_parameters():
            p.copy_(tensors[f"param.{n}"])
        fired_at.copy_(tensors["fired_at"])
    opt.load_state_dict(adam)       # torch puts each tensor where opt needs it: fused Adam wants `step` on the GPU
    torch.set_rng_state(tensors["rng.torch"])
    return state


def adam_state_dict(opt, sae, tensors):
    """opt's own state_dict with the checkpoint's "adam.<param>.<key>" tensors as its state, keyed by
    each parameter's index in opt; its param_groups (fused, lr_scale...) are opt's, not the file's.
    Each moment is laid out like its parameter (W_enc is W_dec^T, column-major), as Adam lays out its
    own: the file holds them row-major, and fused Adam walks parameter, gradient and moments as one
    flat array, so a row-major moment of a column-major parameter updated the wrong entries."""
    index = {id(p): i for i, p in enumerate(p for group in opt.param_groups for p in group["params"])}
    state = {}
    for n, p in sae.named_parameters():
        moments = {k.removeprefix(f"adam.{n}."): v for k, v in tensors.items() if k.startswith(f"adam.{n}.")}
        assert all(v.shape == p.shape for k, v in moments.items() if k != "step")
        if moments:
            state[index[id(p)]] = {k: v if k == "step" else torch.empty_strided(v.shape, p.stride(), dtype=v.dtype).copy_(v)
                                   for k, v in moments.items()}
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def start_log(log_path, resume, step):
    """A new run starts a new log (its folder created); a resumed one drops the records of steps after
    its checkpoint (they are redone) and any line a kill cut short."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and not resume:
        log_path.unlink()
    if log_path.exists() and resume:
        kept = [line for line in log_path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
        atomic_write(log_path, lambda f: f.write("".join(kept).encode()))


def _logged_step(line):
    """The step of a log.jsonl line; infinity for a line a kill cut short (it is dropped)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


# --- The log --------------------------------------------------------------------------------------


class Log:
    """log.jsonl, one record per call, and the progress bar, closed on every way out of a `with`
    block; rank 0 alone writes. Each record has the batch's loss, MSE (||x - x_hat||^2 summed over
    d_in, the mean over tokens, on the scaled inputs) and L0 (over the global batch); the L0 and FVU
    at inference of a held-out sample of one batch (heldout_*; evaluate.py measures the whole split);
    the dead fraction (no firing in the last DEAD_LOG_TOKENS tokens), lambda, lr, the step's path;
    tokens/s since the last record, and "vs_ceiling": the dense-equivalent FLOP/s over the FLOP/s
    of one dense matmul measured then. A dense step stays below 1; the sparse path, which skips
    most of the work, passes it. `append` adds a record of its own (BatchTopK's calibration)."""

    def __init__(self, path, sae, x_eval_BD, fired_at, *, batch_size, start, steps, world, rank, autocast, quiet):
        self.path, self.sae, self.x_eval_BD, self.fired_at = path, sae, x_eval_BD, fired_at
        self.B, self.world, self.rank, self.autocast, self.quiet = batch_size, world, rank, autocast, quiet
        self.bar = tqdm(total=steps, initial=start, unit="step", desc="train", disable=quiet or rank != 0)
        self.since = (time.perf_counter(), start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def write(self, step, result, l0_coefficient, lr, path):
        B, (d_in, d_sae) = self.B, self.sae.W_enc.shape
        loss, mse = all_mean(torch.stack([result["loss"].detach(), result["mse"].detach()]).float(), self.world).tolist()
        prefixes = {"prefix_mse": all_mean(result["prefix_mse"].detach().float(), self.world).tolist()} \
            if "prefix_mse" in result else {}            # Matryoshka: each proper prefix's MSE
        if self.rank != 0:
            return {}
        device = self.x_eval_BD.device
        heldout = self.heldout()
        tokens_per_s = (step - self.since[1]) * B / (time.perf_counter() - self.since[0])
        # A dense step's matmuls, 2 FLOPs per multiply-add: x @ W_enc and f @ W_dec forward, then the
        # gradients of W_dec, f and W_enc: 5 x 2 x B x d_in x d_sae. The sparse path does only the
        # first densely, so this is dense-equivalent work. The ceiling is measured now, on one rank's
        # slice, times the ranks: on a shared machine it moves with the load.
        flops = 10 * d_in * d_sae * tokens_per_s
        ceiling = self.world * matmul_ceiling(device, B // self.world, d_in, d_sae,
                                              torch.bfloat16 if self.autocast else torch.float32)
        dead = self.fired_at <= step - min(DEAD_LOG_TOKENS // B, step)     # never fired, in a run shorter than that
        r = {"step": step, "loss": loss, "mse": mse, "l0": result["l0"].item(), **heldout,
             "dead_fraction": dead.float().mean().item(), "l0_coefficient": l0_coefficient, "lr": lr, "path": path,
             "tokens_per_s": tokens_per_s, "flops_per_s": flops, "vs_ceiling": flops / ceiling, **prefixes}
        if self.sae.architecture == "batchtopk":                   # the running estimate, logged only
            r["threshold_running"] = self.sae.threshold.item()
        self.append(r)
        heldout_l0 = r["heldout_l0"]
        if not self.quiet:
            lam_text = f"lambda {l0_coefficient:.3g} " if l0_coefficient is not None else ""      # TopK has none
            self.bar.write(f"step {step}: loss {loss:.4f} mse {mse:.4f} L0 {r['l0']:.1f} | held-out sample L0 "
                           f"{heldout_l0:.1f} FVU {r['heldout_fvu']:.4f} | dead {r['dead_fraction']:.1%} {lam_text}lr "
                           f"{lr:.3g} | {tokens_per_s:,.0f} tok/s, {r['vs_ceiling']:.2f}x dense ceiling"
                           + (f" ({self.world} ranks)" if self.world > 1 else ""))
        self.bar.set_postfix(l0=f"{heldout_l0:.1f}", fvu=f"{r['heldout_fvu']:.3f}", dead=f"{r['dead_fraction']:.1%}",
                             tok_s=f"{tokens_per_s:,.0f}", vs_ceiling=f"{r['vs_ceiling']:.2f}x")
        self.since = (time.perf_counter(), step)
        return r

    def heldout(self):
        """{"heldout_l0", "heldout_fvu"} of the held-out batch at inference (BatchTopK: its threshold)."""
        device = self.x_eval_BD.device
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.autocast):
            f_BF = self.sae.encode(self.x_eval_BD)
            heldout_l0, x_hat_BD = (f_BF != 0).float().sum(-1).mean().item(), self.sae.decode(f_BF)
        return {"heldout_l0": heldout_l0, "heldout_fvu": fvu(self.x_eval_BD, x_hat_BD.float())}

    def append(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def matmul_ceiling(device, B, d_in, d_sae, dtype, repeats=3):
    """FLOP/s of one [B, d_in] @ [d_in, d_sae] matmul on random data, measured now: what a training
    step could reach (bench.py's ceiling too)."""
    a, b = torch.randn(B, d_in, device=device, dtype=dtype), torch.randn(d_in, d_sae, device=device, dtype=dtype)
    a @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return repeats * 2 * B * d_in * d_sae / (time.perf_counter() - t)


def fvu(x_BD, x_hat_BD):
    """docs/maths.md section 5: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return ((x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()).item()


# --- The step, and what the loop calls around it, in its order -------------------------------------


def next_batch(stream, scale, device, dtype, ckpt):
    """The next training batch, on the device, in dtype and scaled; a NaN in the shards stops the run in one sentence."""
    try:
        return next(stream).to(device, dtype, non_blocking=True) * scale
    except ValueError as e:
        raise ValueError(f"{e}; training stopped, {last_good(ckpt)}; re-harvest that shard.") from None


def last_good(ckpt):
    return f"the last good checkpoint is {ckpt}" if Path(ckpt).is_file() else "no checkpoint was written yet"


def l0_coefficient_at(step, l0_coefficient, warmup_steps):
    """lambda warmed up linearly from 0 over `warmup_steps` (None, TopK's, stays None)."""
    return l0_coefficient * min(1.0, step / warmup_steps) if warmup_steps > 0 and l0_coefficient else l0_coefficient


def lr_at(step, total_steps, lr, warmup_steps, decay_fraction=0.0):
    """Cosine warm-up from 0.1 lr to lr over `warmup_steps`, then constant; with `decay_fraction`
    > 0, a linear decay to 0 over that last fraction of training."""
    if step < warmup_steps:
        return lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / warmup_steps)))
    decay_start = total_steps * (1 - decay_fraction)
    if decay_fraction > 0 and step >= decay_start:
        return lr * max(0.0, (total_steps - step) / (total_steps - decay_start))
    return lr


def set_lr(opt, lr):
    """Each parameter group's learning rate: lr times the group's scale (the thresholds' own); returns lr."""
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


# The auto path: sparse while L0 / d_sae is below this fraction, by device, autocast and whether
# the loss is compiled; the crossovers measured by bench.py (BENCHMARKS.md). A rule of the state
# rather than a timing, so that a run, and a resumed run, take the same path at every step.
SPARSE_BELOW = {
    ("cpu", False, False): 0.02, ("cpu", False, True): 0.02,   # sparse 2.5-5x faster at 0.3-1.2%
    ("cpu", True, False): 0.02, ("cpu", True, True): 0.02,
    ("cuda", False, False): 0.02, ("cuda", False, True): 0.02,  # float32: sparse 1.8-3x at 0.07-0.3%
    ("cuda", True, False): 0.001,    # bf16 eager: sparse 0.6x at 0.3%, 1.3-2.2x at 0.07%
    ("cuda", True, True): 0.0005,    # bf16 compiled: dense 19.8 ms against sparse 23.9 at 0.07% (d_in 2,304)
}


def choose_path(mode, l0, d_sae, device_type, autocast, compiled=False):
    """"dense" or "sparse" for a JumpReLU step: `mode` itself unless it is "auto"; then sparse
    when the last step's L0 is a small enough fraction of the latents (SPARSE_BELOW)."""
    if mode != "auto":
        return mode
    return "sparse" if l0 < SPARSE_BELOW[device_type, bool(autocast), bool(compiled)] * d_sae else "dense"


def dead_steps(hp):
    """The window, in steps, after which a latent that has not fired counts as dead in training (the
    log's dead fraction takes DEAD_LOG_TOKENS instead). TopK's and BatchTopK's AuxK: Gao et al.'s 10M
    tokens, but at most an eighth of the run, so that a latent that dies early has most of the run
    to be revived (10M tokens is longer than this project's CPU runs); at 250 steps of 2,048 that is
    31 batches (63k tokens), which a latent firing on 1 token in 10,000 (a fortieth of the mean rate
    at L0 10 over 2,304 latents) misses with probability 0.2%. JumpReLU's dead-threshold pull and
    Anthropic's pre-activation loss: dead_window_tokens."""
    if hp["arch"] in TOPK:
        return max(1, min(GAO_WINDOW_TOKENS // hp["batch_size"], hp["steps"] // 8))
    return hp["dead_window_tokens"] // hp["batch_size"]


def train_step(sae, opt, loss_fn, x_BD, l0_coefficient, fired_at, step, *, dead_steps, world=1, autocast=False):
    """One optimiser step of any architecture, train.py's and bench.py's: the loss, given the
    sparsity coefficient and the latents that have not fired in the last `dead_steps` steps;
    backward; the gradients averaged over the ranks (torchrun); the decoder-gradient projection,
    Adam and the decoder renormalised (docs/maths.md section 3.1; no-ops for the SAEs whose decoder
    norms are free, ReLU and Anthropic's); and each latent's last firing step in fired_at. Returns
    the loss's dict, its "l0" the mean over the global batch, detached.

    fired_at[i] is the number of steps done when latent i last fired, and starts at 0: before step
    `step` a latent is dead when it has not fired in the last dead_steps batches, so no latent is
    dead before it has had dead_steps batches to fire (Gao et al.'s "not activated in N tokens")."""
    dead_F = fired_at <= step - dead_steps
    with torch.autocast(device_type=x_BD.device.type, dtype=torch.bfloat16, enabled=autocast):
        result = loss_fn(x_BD, l0_coefficient, dead_F)
    result["l0"] = all_mean(result["l0"].detach(), world)
    if not torch.isfinite(result["loss"]):
        raise FloatingPointError(f"the loss became {result['loss'].item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    result["loss"].backward()
    if world > 1:
        average_gradients_(list(sae.parameters()), world)
    sae.remove_parallel_decoder_grad_()
    opt.step()
    sae.normalize_decoder_()
    fired_at[any_rank(result["fired"], world)] = step + 1
    return result


# --- After a step: checkpoints, and the SAE at the end ----------------------------------------------


def checkpoint(ckpt, sae, opt, fired_at, state, rank, world):
    """Rank 0 writes the checkpoint; under torchrun every rank waits until it is whole."""
    if rank == 0:
        save_checkpoint(ckpt, sae, opt, fired_at, state)
    if world > 1:
        dist.barrier()


def save_checkpoint(path, sae, opt, fired_at, state):
    """Weights, Adam moments and the latents' last firing steps as tensors, the rest as JSON in the
    file's metadata; written to a temporary file and renamed, so a kill never leaves half a file."""
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
    tensors.update({f"buffer.{n}": b.detach().cpu().contiguous() for n, b in sae.named_buffers()})
    tensors["fired_at"] = fired_at.cpu()
    for n, p in sae.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"adam.{n}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    data = save(tensors, metadata={"state": json.dumps(state)})
    atomic_write(path, lambda f: f.write(data))


def finish(out, sae, scale, log, record, batches, metadata):
    """After the last step, on rank 0: BatchTopK's inference threshold set from the trained SAE,
    calibrate_threshold_ over `batches` (CALIBRATION_BATCHES of them; the running estimate stays in
    the record as "threshold_running"), with the held-out L0 and FVU it gives, logged; then the SAE
    saved. Returns the last record."""
    if sae.architecture == "batchtopk":
        record = {**record, "record": "calibration", "threshold_running": sae.threshold.item(),
                  "threshold": sae.calibrate_threshold_(batches), **log.heldout()}
        log.append(record)
        if not log.quiet:
            log.bar.write(f"BatchTopK's inference threshold calibrated: {record['threshold']:.4g} (running estimate "
                          f"{record['threshold_running']:.4g}), held-out sample L0 {record['heldout_l0']:.1f} FVU "
                          f"{record['heldout_fvu']:.4f}")
    save_sae(out, sae, scale, metadata)
    return record


def save_sae(out, sae, scale, metadata):
    """The trained SAE, as its architecture's plain class on the CPU, with the input scale folded in
    (it takes raw activations) and its provenance in config.json."""
    k = {"k": sae.k} if hasattr(sae, "k") else {}
    bandwidth = {"bandwidth": sae.bandwidth} if sae.architecture == "jumprelu" else {}
    final = make_sae(sae.architecture, sae.d_in, sae.d_sae, **k, **bandwidth, device="cpu")
    final.load_state_dict(sae.state_dict())
    final.metadata = metadata
    final.fold_input_scale_(scale)
    sae_folder.save(final, out)


# --- torchrun: the processes, and what they share -------------------------------------------------


def processes(device):
    """(rank, local_rank, world, device): torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without
    them this is one process, rank 0 of 1. Under torchrun each rank on CUDA takes its own GPU."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return rank, local_rank, world, device


def join_group(world, device_type):
    """Under torchrun, the process group, unless the caller made one; returns whether it was made here."""
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return own_group


def leave_group(own_group):
    if own_group:
        dist.barrier()           # no rank tears the group down while rank 0 still writes (seen: an abort under load)
        dist.destroy_process_group()


def broadcast_(sae, scale, device):
    """The same seed and sample gave every rank the same start; rank 0's, to be sure. Returns rank 0's
    input scale."""
    with torch.no_grad():
        for t in (*sae.parameters(), *sae.buffers()):
            dist.broadcast(t, 0)
        numbers = torch.tensor([scale, getattr(sae, "bandwidth", 0.0)], dtype=torch.float64, device=device)
        dist.broadcast(numbers, 0)
    if sae.architecture == "jumprelu":
        sae.bandwidth = numbers[1].item()
    return numbers[0].item()


def all_mean(t, world):
    """The mean over the ranks of the detached tensor t; t, detached, in one process."""
    if world == 1:
        return t.detach()
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world


@torch.compiler.disable
def global_mean(t_N, world):
    """The mean of t_N over every rank's rows (dim 0), with the gradient of this rank's own rows
    (through m - m.detach(), which is zero): averaged over the ranks, the global batch's gradient.
    The batch statistics of a loss: the target_batch penalty's mean L0, TopK's AuxK and Var(x)."""
    m = t_N.mean(0)
    return all_mean(m, world) + (m - m.detach())


def average_gradients_(params, world):
    """Replace each gradient by its mean over the ranks, with one all_reduce of a flat buffer (gloo
    has no ReduceOp.AVG, so: sum, then divide)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def any_rank(fired_F, world):
    """The latents that fired on some rank's rows; fired_F itself in one process."""
    if world == 1:
        return fired_F
    fired = fired_F.int()
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    return fired.bool()


# --- The command line -------------------------------------------------------------------------------


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--acts", required=True, type=acts.folder, help="folder written by harvest.py")
    p.add_argument("--out", required=True, type=cli.out_folder,
                   help="SAE folder to write, created (with several sparsities: the parent folder)")
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--target-l0", type=cli.positive, nargs="+", default=None,
                          help="hold the L0 at K (default 32 with --recipe small; k for topk/batchtopk); several values "
                               "train a sweep")
    sparsity.add_argument("--l0-coefficient", type=cli.positive, nargs="+", default=None,
                          help="fixed lambda of the L0 term (of the L1 term for relu/gated); several values train a sweep")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="small (default) or paper (docs/maths.md section 3.1)")
    fixed = []                                        # the settings the recipe alone sets, listed after the options
    for name, s in SETTINGS.items():
        default = f"{s.small}" if s.paper == s.small else f"paper {s.paper}, small {s.small}"
        if s.option is None:
            shown = f"{name}: {s.help}" + (f" ({default})" if (s.paper, s.small) != (None, None) else "")
            fixed.append(textwrap.fill(shown, 100, initial_indent="  ", subsequent_indent="      "))
        else:
            help = s.help + (f" (default: {default})" if s.small is not None else "")
            p.add_argument(f"--{name.replace('_', '-')}", default=None, help=help.replace("%", "%%"), **s.option)
    p.epilog += "\n\nSet by the recipe alone (train.train takes each by name):\n" + "\n".join(fixed)
    p.add_argument("--resume", action="store_true",
                   help="carry on from --out/checkpoint.safetensors with the settings it was made with (a run without "
                        "one starts); of the settings, only --steps and how to run (--device...) may change")
    args = p.parse_args(argv)
    given = {name: getattr(args, name) for name, s in SETTINGS.items() if s.option is not None}
    rank = int(os.environ.get("RANK", 0))             # under torchrun, rank 0 alone prints
    try:
        runs = plan(args, given)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for out, hp in runs:
        ckpt = out / CHECKPOINT
        if args.resume and ckpt.is_file() and read_checkpoint(ckpt, tensors=False)[0]["step"] >= hp["steps"]:
            if rank == 0:
                print(f"{out} is already trained to step {hp['steps']}; pass a larger --steps to train on.")
            continue
        if rank == 0 and len(runs) > 1:
            print(f"== {out}")
        try:
            r = train(args.acts, str(out), hp, resume=args.resume)
        except ValueError as e:
            if dist.is_initialized():
                dist.destroy_process_group()
            sys.exit(f"error: {e}")
        except OSError as e:     # a full disk: the checkpoint and SAE folder on disk are still whole
            sys.exit(f"error: writing to {out} failed ({e.strerror or e}); free space, then rerun with --resume.")
        except KeyboardInterrupt:
            if rank == 0:
                print(interrupted(ckpt, argv, args, len(runs) > 1), file=sys.stderr)
            sys.exit(130)
        if rank == 0:
            print(last_line(out, r, hp))


def plan(args, given):
    """The runs of a command line as (out, settings), each checked before the first one starts: one
    per sparsity value, a sweep writing each SAE to OUT/<arch>_l0_<K> (or _lambda_<value>). A new run
    of the small recipe with no sparsity given holds L0 at 32."""
    key, values = ("target_l0", args.target_l0) if args.target_l0 else ("l0_coefficient", args.l0_coefficient or [None])
    runs = []
    for value in values:
        out = Path(args.out)
        if len(values) > 1:
            out = out / f"{args.arch or 'jumprelu'}_{'l0' if key == 'target_l0' else 'lambda'}_{value:g}"
        ckpt = out / CHECKPOINT
        sparsity = {key: value}
        if value is None and args.recipe in (None, "small") and not (args.resume and ckpt.is_file()):
            sparsity = {"target_l0": 32}
        runs.append((out, run_settings(args.acts, ckpt, args.resume, recipe=args.recipe, **sparsity, **given)))
    return runs


def interrupted(ckpt, argv, args, sweep):
    """Ctrl-C's one line: the checkpoint kept, and the command that carries on."""
    if not ckpt.is_file():
        return f"interrupted before the first checkpoint of {ckpt.parent}; nothing is kept, rerun the command to start again."
    again = ["--acts", str(args.acts), "--out", str(args.out)] if not sweep else list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "train.py", *again, *([] if "--resume" in again else ["--resume"])])
    step = read_checkpoint(ckpt, tensors=False)[0]["step"]
    return f"interrupted: {ckpt} (step {step}) is kept; carry on with: {command}"


def last_line(out, r, hp):
    """Training's last line: where the SAE is, its held-out sample's figures, and a warning where the L0
    ended more than 10% from --target-l0."""
    line = (f"wrote the SAE to {out}: L0 {r['heldout_l0']:.1f}, FVU {r['heldout_fvu']:.3f} on a held-out sample of "
            f"{hp['batch_size']:,} tokens (evaluate.py measures the whole split), dead {r['dead_fraction']:.1%} "
            f"(log: {out}/log.jsonl)")
    K = hp["target_l0"]
    if K and abs(r["heldout_l0"] - K) > 0.1 * K:
        line += (f"\nwarning: the L0 ended at {r['heldout_l0']:.1f}, {abs(r['heldout_l0'] / K - 1):.0%} "
                 f"{'above' if r['heldout_l0'] > K else 'below'} --target-l0 {K:g}; train longer (--steps) for it to settle.")
    return line


if __name__ == "__main__":
    main()
