"""Train a JumpReLU SAE (or a baseline: ReLU, Gated, TopK, BatchTopK) on harvested activations.

    python train.py --acts runs/acts --out runs/sae --target-l0 32            # small-budget recipe
    python train.py --acts runs/acts --out runs/sweep --target-l0 16 32 64    # a sweep: runs/sweep/jumprelu_l0_16 ...
    python train.py --acts runs/acts --out runs/topk --arch topk --target-l0 32   # baselines: --arch
    python train.py --acts runs/acts --out runs/sae --l0-coefficient 1e-3 --steps 200000 --recipe paper
    python train.py --acts runs/acts --out runs/sae --resume                  # carry on a killed run
    torchrun --nproc-per-node 8 train.py --acts runs/acts --out runs/sae --target-l0 32   # 8 GPUs, data parallel

Inputs are multiplied by one scalar so that E||x||^2 = 1 over the training split (SPEC section 3,
estimated once from a sample); the saved SAE has it folded in and takes raw activations. Sparsity
is set by a fixed L0 coefficient (lambda), or by --target-l0 K, which holds the L0 at K: with a
quadratic penalty around K (the small recipe) or a controller on lambda (--sparsity l0).
The baselines (SPEC section 4, baselines.py) take the same --target-l0: k itself for TopK and
BatchTopK, the PI controller on the L1 coefficient for ReLU and Gated (or a fixed --l0-coefficient,
which is then their L1 coefficient). They share the optimiser, schedule, batch, b_dec and
orthogonal initialisation; the JumpReLU-only parts (thresholds, bandwidth, dead-threshold pull) not.

Writes to --out: config.json and sae.safetensors (the SAE), log.jsonl (one record per --log-every
steps) and checkpoint.safetensors (weights, Adam state, step, lambda; written atomically).

Under torchrun (WORLD_SIZE > 1) training is data parallel: each rank reads its slice of every global
batch of --batch-size rows, the gradients and the batch L0 are averaged over the ranks, and rank 0
alone writes the log, the checkpoints and the SAE; the result is that of one process on the same
batches, up to float rounding. BatchTopK, which ranks the whole batch, trains in one process.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

import harvest
from baselines import ARCHITECTURES, make_sae
from jumprelu import atomic_write

# SPEC section 3, exactly: Gemma Scope's recipe, built for billions of tokens.
PAPER = dict(lr=7e-5, betas=(0.0, 0.999), lr_warmup_steps=1000, lr_decay_fraction=0.0, batch_size=4096,
             bandwidth=0.001, threshold_init=0.001, threshold_lr_scale=1.0, l0_warmup_steps=10_000,
             b_dec_init="zeros", orthogonal_init=0, dead_threshold_pull=0.0, dead_window_tokens=2**15,
             sparsity="l0", target_l0_coefficient=None)
# Our recipe for about a million tokens (minutes on a CPU). Each departure from the paper was
# measured on SmolLM2 layer-6 activations; README "Training recipe" has the numbers.
SMALL = dict(lr=1e-3, betas=(0.9, 0.999), lr_warmup_steps=50, lr_decay_fraction=0.2, batch_size=2048,
             bandwidth="auto",               # 0.3 x the median pre-activation std (SPEC's 0.001 is ~4% of it)
             threshold_init="quantile",      # each latent starts firing on K/d_sae of the tokens
             threshold_lr_scale=20.0,        # log-thresholds move ~2% a step, not ~0.1%
             l0_warmup_steps=0,
             b_dec_init="mean",
             orthogonal_init=2,              # encoder starts orthogonal to the sink and mean directions
             dead_threshold_pull=0.01,       # a dead latent's threshold is pulled down until it fires
             dead_window_tokens=2**15,       # dead: no firing in the last 32k tokens
             sparsity="target_batch",        # lambda (2/K)(L0 - K)^2 on the batch's mean L0
             target_l0_coefficient=5e-3)
AUTO_BANDWIDTH = 0.3   # bandwidth "auto": this fraction of the median over latents of the pre-activation std
RECIPES = {"paper": PAPER, "small": SMALL}


# --- The activation stream -----------------------------------------------------------------

BLOCK = 1024  # rows read together from one shard; blocks, not rows, are shuffled across shards


def stream_plan(shard_rows, batch_size, seed, buffer_rows=2**18):
    """Yield, forever, the (shard, start) blocks of each shuffle buffer and the row order inside it.

    Each epoch permutes all blocks of all shards (numpy Generator seeded by (seed, epoch)); a buffer
    of `buffer_rows` rows gathers consecutive blocks of that order and is permuted again. Only
    indices are computed here, so a resumed run skips ahead without reading any data.
    """
    blocks = [(s, i) for s, n in enumerate(shard_rows) for i in range(0, n, BLOCK)]
    per_buffer = max(1, buffer_rows // BLOCK)
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(blocks))
        for k in range(0, len(order), per_buffer):
            group = [blocks[j] for j in order[k:k + per_buffer]]
            rows = sum(min(BLOCK, shard_rows[s] - i) for s, i in group)
            if rows >= batch_size:
                yield group, rng.permutation(rows)[: rows - rows % batch_size]
        epoch += 1


def batches(shards, batch_size, seed, start_step=0, buffer_rows=2**18, rank=0, world=1):
    """Float32 training batches [batch_size, d_in] from memory-mapped shards, from `start_step` on.

    With `world` > 1 (torchrun), every rank plans the same global batches and yields only its
    slice, rows [rank B/world, (rank + 1) B/world) of each: the slices of ranks 0, 1, ...
    concatenated are the one-process batch. Only the rows yielded are read from disk.
    """
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} cannot be split evenly over {world} ranks; pass a multiple of {world}.")
    B_rank = batch_size // world
    plan = stream_plan([len(a) for a, _ in shards], batch_size, seed, buffer_rows)
    step = 0
    for group, order in plan:
        n = len(order) // batch_size
        if step + n <= start_step:                  # a whole buffer before the resume point
            step += n
            continue
        # The buffer's rows as (shard, row) pairs, in the order of its blocks; order permutes them.
        spans = [(s, i, min(i + BLOCK, len(shards[s][0]))) for s, i in group]
        shard_R = np.concatenate([np.full(end - i, s) for s, i, end in spans])
        row_R = np.concatenate([np.arange(i, end) for s, i, end in spans])
        for b in range(n):
            if step >= start_step:
                picks = order[b * batch_size + rank * B_rank:b * batch_size + (rank + 1) * B_rank]
                yield read_rows(shards, shard_R[picks], row_R[picks], step)
            step += 1


def read_rows(shards, shard_N, row_N, step):
    """Float32 [N, d_in]: row row_N[j] of shard shard_N[j], read shard by shard in ascending row
    order. A one-sentence ValueError names the shard and rows if any of them is NaN or Inf."""
    x_ND = np.empty((len(row_N), shards[0][0].shape[1]), np.float32)
    for s in np.unique(shard_N):
        where = np.flatnonzero(shard_N == s)
        where = where[np.argsort(row_N[where], kind="stable")]
        rows = shards[s][0][row_N[where]]
        bad = ~np.isfinite(rows).all(1)
        if bad.any():
            name = getattr(shards[s][0], "filename", None) or f"shard {s}"
            first, last = row_N[where][bad][[0, -1]]
            raise ValueError(f"{name} holds NaN or Inf activations in rows {first} to {last}, met at step {step}")
        x_ND[where] = rows
    return torch.from_numpy(x_ND)


def sample_rows(shards, n, seed=0):
    """n rows drawn uniformly (without replacement) from all shards, as float32."""
    sizes = np.array([len(a) for a, _ in shards])
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(sizes.sum(), size=min(n, sizes.sum()), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = [shards[s][0][np.sort(picks[(picks >= starts[s]) & (picks < starts[s + 1])] - starts[s])]
           for s in range(len(shards))]
    return torch.from_numpy(np.concatenate(out).astype(np.float32))


def input_scale(x_ND):
    """SPEC section 3: the scalar s with E||s x||^2 = 1 over the sample."""
    return 1.0 / math.sqrt(x_ND.double().pow(2).sum(1).mean().item())


# --- Schedules (SPEC section 3) --------------------------------------------------------------


def lr_at(step, total_steps, lr, warmup_steps, decay_fraction=0.0):
    """Cosine warm-up from 0.1 lr to lr over `warmup_steps`, then constant; with `decay_fraction`
    > 0, a linear decay to 0 over that last fraction of training."""
    if step < warmup_steps:
        return lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / warmup_steps)))
    decay_start = total_steps * (1 - decay_fraction)
    if decay_fraction > 0 and step >= decay_start:
        return lr * max(0.0, (total_steps - step) / (total_steps - decay_start))
    return lr


def l0_coefficient_at(step, l0_coefficient, warmup_steps):
    """lambda warmed up linearly from 0 over `warmup_steps`."""
    return l0_coefficient * min(1.0, step / warmup_steps) if warmup_steps > 0 else l0_coefficient


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


# --- Threshold initialisation and bandwidth --------------------------------------------------


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
    if sae.architecture != "jumprelu":
        if hp["b_dec_init"] == "mean":
            sae.b_dec.copy_(x_ND.mean(0))
        return
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


# --- Checkpoints -----------------------------------------------------------------------------


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


def load_checkpoint(path, sae, opt, fired_at):
    """Restore a checkpoint into sae, opt and fired_at; returns its JSON state. One-sentence
    ValueError for a damaged file or one written for another architecture or width."""
    try:
        with safe_open(str(path), "pt") as f:
            state = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert isinstance(state, dict) and isinstance(state.get("step"), int)
        expected = {f"param.{n}": p.shape for n, p in sae.named_parameters()}
        expected.update({f"buffer.{n}": b.shape for n, b in sae.named_buffers()}, fired_at=fired_at.shape)
        assert all(k in tensors and tensors[k].shape == shape for k, shape in expected.items())
    except Exception as e:
        raise ValueError(f"{path} is damaged or belongs to another SAE ({type(e).__name__}); delete it to start "
                         "afresh or pass the settings it was made with.") from None
    with torch.no_grad():
        for n, b in sae.named_buffers():
            b.copy_(tensors[f"buffer.{n}"])
        for n, p in sae.named_parameters():
            p.copy_(tensors[f"param.{n}"])
            moments = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"adam.{n}.")}
            if moments:
                opt.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in moments.items()}
        fired_at.copy_(tensors["fired_at"])
    torch.set_rng_state(tensors["rng.torch"])
    return state


# --- Training --------------------------------------------------------------------------------


def _logged_step(line):
    """The step of a log.jsonl line; infinity for a line a kill cut short (it is dropped)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def last_good(ckpt):
    return f"the last good checkpoint is {ckpt}" if Path(ckpt).is_file() else "no checkpoint was written yet"


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
    """SPEC section 5: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return ((x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()).item()


def average_gradients_(params, world):
    """Under torchrun: replace each gradient by its mean over the ranks, with one all_reduce of a
    flat buffer (gloo has no ReduceOp.AVG, so: sum, then divide)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def all_mean(t, world):
    """The mean over the ranks of the detached tensor t; t itself in one process."""
    if world == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world


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


def train(acts, out, *, arch="jumprelu", d_sae=None, steps=600, target_l0=None, l0_coefficient=None,
          recipe="small", seed=0, log_every=25, checkpoint_every=100, resume=False, device=None, autocast=None,
          path="auto", compile_loss=None, quiet=False, **overrides):
    """Train an SAE of `arch` on the harvested folder `acts`; write it to `out`. Returns the last log
    record (on rank 0; {} on the other ranks under torchrun).

    `path` (JumpReLU only): the dense or the sparse loss path, which the tests prove give the same
    loss and gradients, or "auto": sparse once L0 is a small enough fraction of d_sae (choose_path).
    `compile_loss`: run the loss through torch.compile (default: JumpReLU's on CUDA, where it fused the
    dense step's elementwise work into 1.5-2x the eager speed; not on a CPU, where it gained
    2-10% for a minute of compiling)."""
    out = Path(out)
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process, rank 0 of 1.
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"                   # one GPU per rank
        torch.cuda.set_device(device)
    device_type = torch.device(device).type
    autocast = (device_type == "cuda") if autocast is None else autocast
    # Compiled by default where it was measured: JumpReLU on CUDA. TopK's AuxK picks k_aux from the
    # number of dead latents, a value that changes from step to step and would recompile its loss.
    compile_loss = (device_type == "cuda" and arch == "jumprelu") if compile_loss is None else compile_loss
    hp = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHITECTURES)}, not {arch!r}.")
    if world > 1 and arch == "batchtopk":
        raise ValueError("--arch batchtopk ranks the latents of the whole batch, which data parallel training splits "
                         "over the ranks; train it in one process (python train.py, without torchrun).")
    topk = arch in ("topk", "batchtopk")
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"--path must be auto, dense or sparse, not {path!r}.")
    if path == "sparse" and arch != "jumprelu":
        raise ValueError(f"--path sparse is JumpReLU's; --arch {arch} trains on the dense path (leave --path at auto).")
    if target_l0 is None and l0_coefficient is None:
        raise ValueError("set the sparsity with --target-l0 K or --l0-coefficient LAMBDA.")
    if topk and (target_l0 is None or target_l0 != int(target_l0) or target_l0 < 1):
        raise ValueError(f"--arch {arch} needs --target-l0 K, a positive whole number (its k), not {target_l0}.")
    B = hp["batch_size"]                                  # the global batch, split over the ranks
    if B % world:
        raise ValueError(f"--batch-size {B} cannot be split evenly over {world} ranks; pass a multiple of {world}.")
    verify = local_rank == 0                              # one checksum pass per machine
    manifest, shards = harvest.open_split(acts, "train", verify=verify)
    _, heldout = harvest.open_split(acts, "heldout", verify=verify)
    d_in = manifest["d_in"]
    d_sae = d_sae or 8 * d_in
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    torch.manual_seed(seed)
    sample = sample_rows(shards, 16_384, seed)
    if not torch.isfinite(sample).all():
        raise ValueError(f"{acts} holds NaN or Inf activations; harvest it again.")
    scale = input_scale(sample)
    x_eval = sample_rows(heldout, B, seed).to(device) * scale
    if arch == "jumprelu":
        sae = make_sae(arch, d_in, d_sae, device=device,
                       bandwidth=hp["bandwidth"] if hp["bandwidth"] != "auto" else 0.001,
                       threshold_init=hp["threshold_init"] if hp["threshold_init"] != "quantile" else 0.001)
    else:
        sae = make_sae(arch, d_in, d_sae, k=int(target_l0) if topk else None, device=device)
    init_from_data(sae, sample[:4096].to(device) * scale, target_l0 or 32, hp)
    if world > 1:              # the same seed and sample gave every rank the same start; rank 0's, to be sure
        with torch.no_grad():
            for t in (*sae.parameters(), *sae.buffers()):
                dist.broadcast(t, 0)
            numbers = torch.tensor([scale, getattr(sae, "bandwidth", 0.0)], dtype=torch.float64, device=device)
            dist.broadcast(numbers, 0)
        scale = numbers[0].item()
        if arch == "jumprelu":
            sae.bandwidth = numbers[1].item()
    thresholds = [sae.log_threshold] if arch == "jumprelu" else []
    others = [p for p in sae.parameters() if all(p is not t for t in thresholds)]
    opt = torch.optim.Adam([{"params": others, "lr_scale": 1.0},
                            {"params": thresholds, "lr_scale": hp["threshold_lr_scale"]}],
                           lr=hp["lr"], betas=hp["betas"], eps=1e-8, fused=device_type == "cuda")
    # sparsity "l0": the paper's lambda * L0, lambda set by a controller for --target-l0;
    # "target_row" / "target_batch": lambda (2/K)(L0 - K)^2 per row (Gemma Scope 2) or on the
    # batch mean, with a fixed lambda: a force towards K from both sides.
    if not target_l0 or arch != "jumprelu":
        hp["sparsity"] = "l0"            # a fixed lambda (the paper's penalty), or a baseline's L1 term
    quadratic = hp["sparsity"] != "l0"
    if quadratic:
        l0_coefficient = l0_coefficient or hp["target_l0_coefficient"]
    controller = TargetL0(target_l0, l0_coefficient or 1e-3) if target_l0 and not quadratic and not topk else None
    state = {"step": 0, "l0_coefficient": controller.value if controller else l0_coefficient}
    fired_at = torch.full((d_sae,), -1, device=device)      # the last step each latent fired (-1: never)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.safetensors"
    if resume:
        if not ckpt.is_file():
            raise ValueError(f"--resume: {ckpt} does not exist; start without --resume.")
        state = load_checkpoint(ckpt, sae, opt, fired_at)
        if state.get("arch", "jumprelu") != arch or state.get("d_sae") not in (None, d_sae):
            raise ValueError(f"{ckpt} holds a {state.get('arch', 'jumprelu')} SAE of width {state.get('d_sae')}, "
                             f"not this --arch {arch} of width {d_sae}; pass the same settings or another --out.")
        if state["step"] >= steps:
            raise ValueError(f"{ckpt} is already at step {state['step']}; pass a larger --steps to train on.")
        scale = state["scale"]
        if arch == "jumprelu":
            sae.bandwidth = state["bandwidth"]
        if controller:
            controller.load(state["controller"])
    log_path = out / "log.jsonl"
    if rank == 0 and not resume and log_path.exists():
        log_path.unlink()
    if rank == 0 and resume and log_path.exists():     # drop the records of steps after the checkpoint: they are redone
        kept = [line for line in log_path.read_text().splitlines(keepends=True) if _logged_step(line) <= state["step"]]
        atomic_write(log_path, lambda f: f.write("".join(kept).encode()))

    # The step's matmuls, 2 FLOPs per multiply-add: x @ W_enc and f @ W_dec forward, then the
    # gradients of W_dec, f and W_enc (none for the input x): 5 x 2 x B x d_in x d_sae, over all ranks.
    # The sparse path does only the first of them densely: its "mfu" is dense-equivalent and can
    # pass 100% (the log's "path" says which path the step took).
    flops_per_step = 10 * B * d_in * d_sae
    stream = batches(shards, B, seed, start_step=state["step"], buffer_rows=hp.get("buffer_rows", 2**18),
                     rank=rank, world=world)
    lam = state["l0_coefficient"]
    # Compiled, the dense path fuses its elementwise passes; the sparse path stays eager: its kept
    # entries change in number every step, which recompiled it step after step on an H100.
    if compile_loss:
        torch._dynamo.reset()    # what an earlier compile in this process cached tripped dynamo (torch 2.13)
    compiled_loss = torch.compile(sae.loss) if compile_loss else sae.loss
    l0 = state.get("last_l0", d_sae)                        # the last step's L0, for choose_path
    record, t_log, step_log = {}, time.perf_counter(), state["step"]
    bar = tqdm(total=steps, initial=state["step"], unit="step", desc="train", disable=quiet or rank != 0)
    for step in range(state["step"], steps):
        try:
            x_BD = next(stream).to(device, non_blocking=True) * scale
        except ValueError as e:
            raise ValueError(f"{e}; training stopped, {last_good(ckpt)}; re-harvest that shard.") from None
        lam = controller.value if controller else l0_coefficient_at(step, l0_coefficient, hp["l0_warmup_steps"])
        lr = lr_at(step, steps, hp["lr"], hp["lr_warmup_steps"], hp["lr_decay_fraction"])
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch_target = hp["sparsity"] == "target_batch"      # its term is on the batch mean, added here
        dead_F = fired_at < step + 1 - min(hp["dead_window_tokens"] // B, step + 1)
        step_path = choose_path(path, l0, d_sae, device_type, autocast, compile_loss) if arch == "jumprelu" else "dense"
        loss_fn = sae.loss if step_path == "sparse" else compiled_loss
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
            if topk:
                out_ = loss_fn(x_BD, dead_F=dead_F)            # AuxK on the dead latents
            elif arch == "jumprelu":
                out_ = loss_fn(x_BD, 0.0 if batch_target else lam, target_l0 if hp["sparsity"] == "target_row" else None,
                               sparse=step_path == "sparse")
            else:
                out_ = loss_fn(x_BD, lam)                       # lam is the L1 coefficient
        loss = out_["loss"]
        l0_global = all_mean(out_["l0"].detach(), world)        # the mean L0 of the global batch
        if batch_target:
            # Under torchrun each rank adds the global term's value, and through l0 - l0.detach()
            # (zero) the gradient of its own rows' L0: averaged over the ranks, the global gradient.
            l0_B = out_["l0"] if world == 1 else l0_global + (out_["l0"] - out_["l0"].detach())
            loss = loss + lam * (2.0 / target_l0) * (l0_B - target_l0) ** 2
        if arch == "jumprelu" and hp["dead_threshold_pull"] and dead_F.any():
            # A dead latent's pre-activations never reach its kernel window, so no estimator
            # gradient can lower its threshold: pull its log-threshold down until it fires again.
            loss = loss + hp["dead_threshold_pull"] * sae.log_threshold[dead_F].sum()
        if not torch.isfinite(loss):
            raise ValueError(f"the loss became {loss.item()} at step {step}; {last_good(ckpt)}; lower --lr and --resume.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients_(list(sae.parameters()), world)
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
        l0 = l0_global.item()
        if controller:
            controller.update(l0)
        fired_F = out_["fired"] if "fired" in out_ else (out_["f"] != 0).any(0)
        if world > 1:                                           # fired on any rank's rows
            fired = fired_F.int()
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            fired_F = fired.bool()
        fired_at[fired_F] = step + 1
        bar.update(1)

        log_now = (step + 1) % log_every == 0 or step + 1 == steps
        if log_now:
            loss_mse = all_mean(torch.stack([loss.detach(), out_["mse"].detach()]).float(), world)
        if log_now and rank == 0:
            with torch.no_grad(), torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
                f_eval = sae.encode(x_eval)                     # inference: BatchTopK uses its threshold
                ev = {"l0": (f_eval != 0).float().sum(-1).mean(), "x_hat": sae.decode(f_eval)}
            dt = time.perf_counter() - t_log
            tokens_per_s = (step + 1 - step_log) * B / dt
            # Measured now, not at start-up: on a shared machine the ceiling moves with the load. One
            # rank's matmul on its slice of the batch, times the ranks: the world's ceiling.
            ceiling = world * matmul_ceiling(device, B // world, d_in, d_sae, torch.bfloat16 if autocast else torch.float32)
            record = {"step": step + 1, "loss": loss_mse[0].item(), "mse": loss_mse[1].item(), "l0": l0,
                      "heldout_l0": ev["l0"].item(), "heldout_fvu": fvu(x_eval, ev["x_hat"].float()),
                      # dead: no firing in the last 2^20 tokens, or since the start if fewer
                      "dead_fraction": (fired_at < step + 1 - min(2**20 // B, step + 1)).float().mean().item(),
                      "l0_coefficient": lam, "lr": lr, "path": step_path, "tokens_per_s": tokens_per_s,
                      "flops_per_s": flops_per_step * tokens_per_s / B,
                      "mfu": flops_per_step * tokens_per_s / B / ceiling}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if not quiet:
                lam_text = f"lambda {lam:.3g} " if lam is not None else ""      # TopK has none
                bar.write(f"step {step + 1}: loss {record['loss']:.4f} mse {record['mse']:.4f} L0 {l0:.1f} | held-out "
                          f"L0 {record['heldout_l0']:.1f} FVU {record['heldout_fvu']:.4f} | dead {record['dead_fraction']:.1%} "
                          f"{lam_text}lr {lr:.3g} | {tokens_per_s:,.0f} tok/s, MFU {record['mfu']:.0%}"
                          + (f" ({world} ranks)" if world > 1 else ""))
            bar.set_postfix(l0=f"{record['heldout_l0']:.1f}", fvu=f"{record['heldout_fvu']:.3f}",
                            dead=f"{record['dead_fraction']:.1%}", tok_s=f"{tokens_per_s:,.0f}",
                            mfu=f"{record['mfu']:.0%}")
            t_log, step_log = time.perf_counter(), step + 1
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            state = {"step": step + 1, "scale": scale, "bandwidth": getattr(sae, "bandwidth", None),
                     "arch": arch, "d_sae": d_sae, "last_l0": l0,
                     "l0_coefficient": controller.value if controller else l0_coefficient,
                     "controller": controller.state() if controller else None,
                     "recipe": recipe, "hp": hp, "seed": seed}
            if rank == 0:
                save_checkpoint(ckpt, sae, opt, fired_at, state)
            if world > 1:
                dist.barrier()                                  # the checkpoint is whole before anyone goes on
    bar.close()

    if rank == 0:
        final = make_sae(arch, d_in, d_sae, k=int(target_l0) if topk else None,
                         **({"bandwidth": sae.bandwidth} if arch == "jumprelu" else {}))
        final.load_state_dict(sae.state_dict())
        final.metadata = {"model": manifest["model"], "layer": manifest["layer"], "site": manifest["site"],
                          "hook": manifest["hook"], "context": manifest["context"], "acts": str(acts),
                          "recipe": recipe, "steps": steps, "tokens": steps * B, "seed": seed,
                          "target_l0": target_l0, "l0_coefficient": None if topk else lam}
        final.fold_input_scale_(scale)
        final.save(out)
    if own_group:
        dist.barrier()           # no rank tears the group down while rank 0 still writes (seen: an abort under load)
        dist.destroy_process_group()
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--acts", required=True, help="folder written by harvest.py")
    p.add_argument("--out", required=True, help="SAE folder to write (with several sparsities: the parent folder)")
    p.add_argument("--arch", choices=list(ARCHITECTURES), default="jumprelu",
                   help="jumprelu (default), or a baseline of SPEC section 4")
    p.add_argument("--d-sae", type=int, default=None, help="number of latents (default 8 x d_in)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--target-l0", type=float, nargs="+", default=None,
                          help="hold the L0 at K (default 32; k for topk/batchtopk); several values train a sweep")
    sparsity.add_argument("--l0-coefficient", type=float, nargs="+", default=None,
                          help="fixed lambda of the L0 term (of the L1 term for relu/gated); several values train a sweep")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small", help="small (default) or paper (SPEC section 3)")
    p.add_argument("--sparsity", choices=("l0", "target_batch", "target_row"), default=None,
                   help="with --target-l0: the paper's lambda*L0 with a controller on lambda (l0), or lambda (2/K)(L0-K)^2 "
                        "on the batch mean (target_batch, the small recipe's) or per row (target_row, Gemma Scope 2)")
    for name, kind in (("lr", float), ("batch-size", int), ("bandwidth", float), ("threshold-lr-scale", float),
                       ("lr-warmup-steps", int), ("l0-warmup-steps", int), ("lr-decay-fraction", float)):
        p.add_argument(f"--{name}", type=kind, default=None, help="override the recipe's value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--path", choices=("auto", "dense", "sparse"), default="auto",
                   help="JumpReLU's loss path: dense, sparse (only the active and in-window latents' rows), or auto "
                        "(default: sparse once L0 is a small fraction of --d-sae); both give the same loss and gradients")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the loss through torch.compile (default: JumpReLU's on CUDA, otherwise off; see BENCHMARKS.md)")
    args = p.parse_args(argv)
    if args.target_l0 is None and args.l0_coefficient is None:
        args.target_l0 = [32]
    overrides = {k: getattr(args, k) for k in ("lr", "batch_size", "bandwidth", "threshold_lr_scale", "sparsity",
                                               "lr_warmup_steps", "l0_warmup_steps", "lr_decay_fraction")}
    # One run per sparsity value; a sweep writes each SAE to OUT/<arch>_l0_<K> (or _lambda_<value>).
    key, values = ("target_l0", args.target_l0) if args.target_l0 else ("l0_coefficient", args.l0_coefficient)
    runs = [(args.out if len(values) == 1 else str(Path(args.out) / f"{args.arch}_{'l0' if key == 'target_l0' else 'lambda'}"
             f"_{v:g}"), v) for v in values]
    rank = int(os.environ.get("RANK", 0))             # under torchrun, rank 0 alone prints
    for out, value in runs:
        if len(runs) > 1 and rank == 0:
            print(f"== {args.arch}, {key.replace('_', ' ')} {value:g} -> {out}")
        try:
            r = train(args.acts, out, arch=args.arch, d_sae=args.d_sae, steps=args.steps, recipe=args.recipe,
                      seed=args.seed, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, device=args.device, path=args.path, compile_loss=args.compile,
                      **{key: value}, **overrides)
        except ValueError as e:
            if dist.is_initialized():
                dist.destroy_process_group()
            sys.exit(f"error: {e}")
        except OSError as e:     # a full disk: the checkpoint and SAE folder on disk are still whole
            sys.exit(f"error: writing to {out} failed ({e.strerror or e}); free space, then rerun with --resume.")
        if rank == 0:
            print(f"wrote the SAE to {out}: held-out L0 {r['heldout_l0']:.1f}, FVU {r['heldout_fvu']:.3f}, "
                  f"dead {r['dead_fraction']:.1%} (log: {out}/log.jsonl)")


if __name__ == "__main__":
    main()
