"""Benchmarks that print measured numbers (never asserted in tests): training, harvest, ONNX.

    python bench.py                  # all three sections, full sizes, on CUDA when present
    python bench.py train            # the training step against the matmul ceiling (and SAELens)
    python bench.py harvest          # activations per second, forward stopped at the layer or not
    python bench.py onnx             # encoding throughput: onnxruntime against PyTorch
    python bench.py --quick          # small shapes, one step: checks that the paths run and agree

train: for each (d_in, d_sae) at batch 4,096, the ceiling (one [B, d_in] @ [d_in, d_sae] matmul,
measured then, in the dtype used), then one training step of JumpReLUSAE (the loss, backward,
decoder-gradient projection, Adam, decoder renormalisation: train.py's step without its logging)
in float32 and under bf16 autocast, eager and torch.compile, on the dense path and on the sparse
path. The SAE's thresholds are set so that about 50 latents fire per row, with the small recipe's
bandwidth: the regime of a trained SAE. "of ceiling" counts the dense step's 5 matmuls,
10 x B x d_in x d_sae FLOPs, for every path, so the sparse path can pass 100%. When sae-lens is
installed, its JumpReLU training SAE takes the same step in the same run, and "vs SAELens" is
ours over theirs. Every row also gives the largest difference of its loss and gradients from the
eager dense path in the same dtype (||a - b|| / ||b||, the largest over the loss and the gradients).

Each section prints a Markdown table (BENCHMARKS.md holds them) and all rows go to --json.
"""

import copy
import itertools
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cli
import penalties
import train
from acts import write_json
from jumprelu import JumpReLUSAE

# The paths must agree with the eager dense path within these (||a - b|| / ||b|| of the loss and
# each gradient): float32 rounding, and bf16 rounding where the sparse path decodes in float32.
AGREE = {"float32": 1e-4, "bf16": 3e-2}


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, steps, device, warmup=2):
    """Median seconds of fn() over `steps` calls after `warmup` calls, each call synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --- Training ---------------------------------------------------------------------------------


def trained_looking_sae(d_in, d_sae, batch, l0, device, seed=0):
    """A JumpReLUSAE whose thresholds make about `l0` latents fire per row on inputs with
    E||x||^2 = 1 (each latent's threshold at its 1 - l0/d_sae quantile), the small recipe's
    bandwidth, and a few batches of such inputs."""
    torch.manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, device=device)
    # Thresholds from a batch of their own: placed at values of the timed batches, they would sit
    # exactly on pre-activations, where the last rounding bit of a compiled kernel flips H.
    calibration, *xs = [torch.randn(batch, d_in, device=device) / math.sqrt(d_in) for _ in range(4)]
    with torch.no_grad():
        pre_BF = sae.pre_acts(calibration)
        # torch.quantile refuses large inputs: the k-th largest value per latent is the same thing.
        k = max(1, round(l0 / d_sae * batch))
        theta_F = pre_BF.topk(k, dim=0).values[-1].clamp_min(1e-3)
        sae.log_threshold.copy_(theta_F.log())
        sae.bandwidth = 0.3 * pre_BF.std(0).median().item()       # train.py's "auto" bandwidth
    return sae, xs


def make_step(sae, sparse, dtype, compiled, device):
    """train.py's step (train.train_step, with train.py's Adam of the small recipe) on `sae`, with the
    paper's lambda * L0 at lambda 1e-3. Returns step(x) -> the loss's dict. The learning rate is
    1e-5, so that the timed steps stay in the regime the thresholds were set for."""
    opt = train.make_optimizer(sae, {**train.RECIPES["small"], "lr": 1e-5}, device)
    loss = train.make_loss(penalties.loss, sae, compiled, sparse=sparse)
    fired_at = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    return lambda x_BD: train.train_step(sae, opt, loss, x_BD, 1e-3, fired_at, 0, dead_steps=1,
                                         autocast=dtype == "bf16")


def loss_and_grads(sae, x_BD, sparse, dtype, compiled, device):
    """The loss and every gradient from one forward and backward, without an optimiser step."""
    loss = train.make_loss(penalties.loss, sae, compiled, sparse=sparse)
    sae.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = loss(x_BD, 1e-3)
    out["loss"].backward()
    grads = {name: q.grad.detach().clone() for name, q in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    return out["loss"].detach(), grads


def difference(a, b):
    """The largest relative difference, ||a - b|| / ||b||, of the loss and of each gradient."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    worst = (loss_a - loss_b).abs().item() / max(loss_b.abs().item(), 1e-30)
    for name, g in grads_b.items():
        worst = max(worst, (grads_a[name] - g).norm().item() / max(g.norm().item(), 1e-30))
    return worst


def saelens_step(d_in, d_sae, batch, dtype, device):
    """One training step of SAELens's JumpReLU SAE through its own trainer (SAETrainer.step: the
    forward under autocast, firing statistics, backward, gradient clipping, Adam, schedulers),
    with its default JumpReLU settings, on the same kind of input. None without sae-lens."""
    try:
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, SAETrainer
        from sae_lens.config import SAETrainerConfig
    except ImportError:
        return None
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device=device))
    cfg = SAETrainerConfig(total_training_samples=2**62, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-5,
                           device=device, autocast=dtype == "bf16")
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    x_BD = torch.randn(batch, d_in, device=device) / math.sqrt(d_in)

    def step():                                 # one iteration of SAETrainer.fit, without its logging
        trainer.maybe_reset_sparsity()
        trainer.step(x_BD)
        trainer.n_training_steps += 1
    return step


def bench_train(shapes, batch, steps, device, dtypes, modes, l0=50):
    rows = []
    print(TRAIN_HEADER)
    for d_in, d_sae in shapes:
        base, xs = trained_looking_sae(d_in, d_sae, batch, l0, device)
        flops = 10 * batch * d_in * d_sae
        for dtype in dtypes:
            ceiling = train.matmul_ceiling(device, batch, d_in, d_sae, torch.bfloat16 if dtype == "bf16" else torch.float32,
                                     repeats=10)
            reference = loss_and_grads(base, xs[0], False, dtype, False, device)
            dense_s = None
            for compiled in modes:
                for sparse in (False, True):
                    sae = copy.deepcopy(base)
                    diff = difference(loss_and_grads(sae, xs[0], sparse, dtype, compiled, device), reference)
                    step = make_step(sae, sparse, dtype, compiled, device)
                    batches, out = itertools.cycle(xs), {}
                    seconds = median_time(lambda: out.update(step(next(batches))), steps, device)
                    if not sparse and not compiled:
                        dense_s = seconds
                    rows.append({"d_in": d_in, "d_sae": d_sae, "batch": batch, "dtype": dtype,
                                 "mode": "compile" if compiled else "eager", "path": "sparse" if sparse else "dense",
                                 "step_ms": seconds * 1e3, "tokens_per_s": batch / seconds,
                                 "flops_per_s": flops / seconds, "ceiling_flops_per_s": ceiling,
                                 "of_ceiling": flops / seconds / ceiling, "vs_dense_eager": dense_s / seconds,
                                 "l0": out["l0"].item(), "kept_per_row": out["kept"] * d_sae if sparse else None,
                                 "max_rel_diff": diff})
                    print_train_row(rows[-1])
                    sae = step = None
            theirs = saelens_step(d_in, d_sae, batch, dtype, device)
            if theirs is not None:
                seconds = median_time(theirs, steps, device)
                rows.append({"d_in": d_in, "d_sae": d_sae, "batch": batch, "dtype": dtype, "mode": "eager",
                             "path": "SAELens", "step_ms": seconds * 1e3, "tokens_per_s": batch / seconds,
                             "flops_per_s": flops / seconds, "ceiling_flops_per_s": ceiling,
                             "of_ceiling": flops / seconds / ceiling, "vs_dense_eager": dense_s / seconds})
                print_train_row(rows[-1])
                for r in rows:
                    if (r["d_in"], r["d_sae"], r["dtype"]) == (d_in, d_sae, dtype) and r["path"] != "SAELens":
                        r["vs_saelens"] = seconds / (r["step_ms"] / 1e3)
                del theirs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


TRAIN_HEADER = ("| d_in | d_sae | dtype | mode | path | step ms | tokens/s | TFLOP/s | of ceiling | vs dense eager "
                "| L0 | kept/row | max rel diff |\n"
                "| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def print_train_row(r):
    opt = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else ""
    print(f"| {r['d_in']} | {r['d_sae']:,} | {r['dtype']} | {r['mode']} | {r['path']} | {r['step_ms']:.1f} "
          f"| {r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.2f} | {r['of_ceiling']:.0%} "
          f"| {r['vs_dense_eager']:.2f}x | {opt('l0', '.1f')} | {opt('kept_per_row', '.0f')} "
          f"| {opt('max_rel_diff', '.1e')} |", flush=True)


def print_train_summary(rows):
    ceilings = {(r["d_in"], r["d_sae"], r["dtype"]): r["ceiling_flops_per_s"] for r in rows}
    print("\nceilings (one [B, d_in] @ [d_in, d_sae] matmul): " + ", ".join(
        f"{d_in}x{d_sae} {dtype} {c / 1e12:.2f} TFLOP/s" for (d_in, d_sae, dtype), c in ceilings.items()))
    theirs = [r for r in rows if r["path"] == "SAELens"]
    if theirs:
        print("\nagainst SAELens (its step's time over ours, same shape, dtype and machine):")
        print("| d_in | d_sae | dtype | SAELens ms | ours dense eager | ours sparse eager | best of ours |")
        print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
        for t in theirs:
            same = [r for r in rows if (r["d_in"], r["d_sae"], r["dtype"]) == (t["d_in"], t["d_sae"], t["dtype"])
                    and r["path"] != "SAELens"]
            pick = lambda path: next(r["vs_saelens"] for r in same if r["path"] == path and r["mode"] == "eager")
            print(f"| {t['d_in']} | {t['d_sae']:,} | {t['dtype']} | {t['step_ms']:.1f} | {pick('dense'):.2f}x "
                  f"| {pick('sparse'):.2f}x | {max(r['vs_saelens'] for r in same):.2f}x |")


def profile_step(d_in, d_sae, batch, dtype, sparse, device, l0=50, steps=3):
    """torch.profiler's table of one configuration's training step: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    sae, xs = trained_looking_sae(d_in, d_sae, batch, l0, device)
    step = make_step(sae, sparse, dtype, False, device)
    for x_BD in xs:
        step(x_BD)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(xs[i % len(xs)])
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {d_in}x{d_sae} {dtype} {'sparse' if sparse else 'dense'}, {steps} steps, by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48))


# --- Harvest ----------------------------------------------------------------------------------


def bench_harvest(context, batch, steps, device, layer=None):
    """Tokens per second of the site's activations: the forward stopped at the hooked layer
    (harvest.py's SiteReader) against the whole model's forward with the same hook; and four sites
    (resid and mlp at the layer and at twice its depth) from one pass, against one site at the deeper
    layer, which the same pass also reaches."""
    import harvest
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = harvest.load_model(harvest.DEFAULT_MODEL, device, dtype)
    layer = len(harvest.decoder_layers(model)) // 5 if layer is None else layer
    windows_ = [w for _, (_, w) in zip(range(batch), harvest.token_windows(harvest.python_docs(), tokenizer, context, 20))]
    ids_BT = torch.tensor(windows_, device=device)
    reader = harvest.SiteReader(model, [(layer, "resid")])
    captured = {}
    handle = reader.modules[0].register_forward_hook(lambda m, i, o: captured.update(out=o[0] if isinstance(o, tuple) else o))

    def full():
        with torch.inference_mode():
            model(ids_BT)
    try:
        full()                                      # the site's output from the whole forward
    finally:
        handle.remove()
    agree = (reader(ids_BT)[0].float() - captured["out"].float()).abs().max().item()
    t_full = median_time(full, steps, device, warmup=1)
    t_stop = median_time(lambda: reader(ids_BT), steps, device, warmup=1)
    four = harvest.SiteReader(model, [(l, s) for l in (layer, 2 * layer) for s in ("resid", "mlp")])
    t_four = median_time(lambda: four(ids_BT), steps, device, warmup=1)
    t_deep = median_time(lambda: harvest.SiteReader(model, [(2 * layer, "resid")])(ids_BT), steps, device, warmup=1)
    n = ids_BT.numel()
    return [{"model": "SmolLM2-135M", "layer": layer, "layers": len(harvest.decoder_layers(model)),
             "device": device, "dtype": str(dtype).removeprefix("torch."), "batch": ids_BT.shape[0], "context": context,
             "stopped_tokens_per_s": n / t_stop, "full_tokens_per_s": n / t_full, "speedup": t_full / t_stop,
             "four_sites_tokens_per_s": n / t_four, "deep_site_tokens_per_s": n / t_deep, "max_abs_diff": agree}]


def print_harvest(rows):
    print("| model | layer | device | dtype | batch x context | stopped at layer, tok/s | full forward, tok/s "
          "| speed-up | 4 sites (L, 2L) in one pass, tok/s | 1 site at 2L, tok/s | max abs diff |")
    print("| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['layer']} of {r['layers']} | {r['device']} | {r['dtype']} | {r['batch']} x {r['context']} "
              f"| {r['stopped_tokens_per_s']:,.0f} | {r['full_tokens_per_s']:,.0f} | {r['speedup']:.2f}x "
              f"| {r['four_sites_tokens_per_s']:,.0f} | {r['deep_site_tokens_per_s']:,.0f} | {r['max_abs_diff']:.1e} |")


# --- ONNX -------------------------------------------------------------------------------------


# The encoders export.py writes: float32; float16 weights and matmuls; the top 64 latents of each row.
ONNX_GRAPHS = {"float32": {}, "fp16": {"fp16": True}, "top-k": {"topk": 64}}


def bench_onnx(shapes, batch, steps, device):
    """Each of ONNX_GRAPHS in onnxruntime (CUDA with io-binding, the input already on the GPU, where
    present; the CPU always) against the same graph in PyTorch float32 (export.Graph; float16 weights
    would be minutes a batch on a CPU) and, on CUDA, under bf16 autocast. Agreement is export.py's own
    check against float32 PyTorch, with its tolerance; rows whose active set differs only at a tie
    (within rounding of a threshold or of the k-th value) are counted and left out."""
    import onnxruntime as ort
    import export
    rows = []
    for d_in, d_sae in shapes:
        sae = JumpReLUSAE(d_in, d_sae, threshold_init=0.05)
        x = (np.random.default_rng(0).standard_normal((batch, d_in)) / np.sqrt(d_in)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            for graph, options in ONNX_GRAPHS.items():
                module = export.export(sae, Path(tmp) / f"{graph}.onnx", **options)
                tol, tie_tol = export.tolerances(module.fp16)
                for dev in ["cuda", "cpu"] if device == "cuda" else ["cpu"]:
                    provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[dev]
                    if provider not in ort.get_available_providers():
                        print(f"onnxruntime here has no {provider} (install onnxruntime-gpu): no {dev} row.")
                        continue
                    # float32 matmuls on CUDA too: the CUDA provider's default TF32 rounds the inputs to
                    # 10 mantissa bits and moves pre-activations across thresholds (different work).
                    sess = ort.InferenceSession(str(Path(tmp) / f"{graph}.onnx"), providers=[
                        (provider, {"use_tf32": "0"}) if dev == "cuda" else provider])
                    reference, x_t = export.Graph(sae, topk=module.topk).to(dev), torch.from_numpy(x).to(dev)
                    with torch.no_grad():
                        t_torch, t_bf16 = median_time(lambda: reference(x_t), steps, dev), None
                        if dev == "cuda":
                            with torch.autocast("cuda", torch.bfloat16):
                                t_bf16 = median_time(lambda: reference(x_t), steps, dev)
                    if dev == "cuda":      # keep the input on the GPU, as a pipeline would
                        binding = sess.io_binding()
                        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
                        for name in module.output_names():
                            binding.bind_output(name, "cuda")
                        t_ort = median_time(lambda: sess.run_with_iobinding(binding), steps, "cpu")
                    else:
                        t_ort = median_time(lambda: sess.run(None, {"x": x}), steps, dev)
                    report = export.compare(sess, module, sae, x, tie_tol)
                    rows.append({"device": dev, "graph": graph, "d_in": d_in, "d_sae": d_sae, "batch": batch,
                                 "torch_tokens_per_s": batch / t_torch,
                                 "torch_bf16_tokens_per_s": batch / t_bf16 if t_bf16 else None,
                                 "onnxruntime_tokens_per_s": batch / t_ort, "ratio": t_torch / t_ort,
                                 "ratio_bf16": t_bf16 / t_ort if t_bf16 else None, "max_rel_diff": report["max_rel"],
                                 "tolerance": tol, "tie_rows": report["ties"]})
    return rows


def print_onnx(rows):
    print("| device | graph | d_in | d_sae | batch | PyTorch float32 tok/s | PyTorch bf16 tok/s | onnxruntime tok/s "
          "| ORT / PyTorch float32 | ORT / PyTorch bf16 | max rel diff | rows with a tie |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    opt = lambda v, fmt: format(v, fmt) if v is not None else ""
    for r in rows:
        print(f"| {r['device']} | {r['graph']} | {r['d_in']} | {r['d_sae']:,} | {r['batch']} | {r['torch_tokens_per_s']:,.0f} "
              f"| {opt(r['torch_bf16_tokens_per_s'], ',.0f')} | {r['onnxruntime_tokens_per_s']:,.0f} | {r['ratio']:.2f} "
              f"| {opt(r['ratio_bf16'], '.2f')} | {r['max_rel_diff']:.1e} | {r['tie_rows']} |")


# --- The command --------------------------------------------------------------------------------


def write(path, result):
    """--json, through a temporary file; a full disk ends in one sentence."""
    try:
        write_json(path, result)
    except OSError as e:
        sys.exit(f"error: writing {path} failed ({e.strerror or e}); free space or pass another --json.")


# The argparse types of --shapes (576x16384) and --profile (2304x16384:bf16:dense).
shape = cli.check(lambda t: tuple(int(v) for v in t.lower().split("x")), lambda s: len(s) == 2 and min(s) >= 1,
                  "D_INxD_SAE, such as 576x16384")
profile = cli.check(lambda t: (*shape(t.split(":")[0]), *t.split(":")[1:]),
                    lambda p: p[2:] in [(dtype, path) for dtype in AGREE for path in ("dense", "sparse")],
                    "D_INxD_SAE:DTYPE:PATH, such as 2304x16384:bf16:dense (DTYPE float32 or bf16, PATH dense or sparse)")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("what", nargs="*", metavar="SECTION", help="train, harvest and/or onnx (default: all three)")
    p.add_argument("--quick", action="store_true", help="small shapes and one step: checks that the paths agree (CI)")
    p.add_argument("--device", type=cli.device, default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--shapes", nargs="+", type=shape, default=None, metavar="D_INxD_SAE",
                   help="training shapes (default 576x16384 576x65536 2304x16384 2304x65536 on a GPU; "
                        "576x4096 576x16384 2304x4096 2304x16384 on a CPU)")
    p.add_argument("--steps", type=cli.positive_int, default=None, help="timed steps per row (median; default 10 GPU, 3 CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--profile", nargs="+", type=profile, default=[], metavar="D_INxD_SAE:DTYPE:PATH",
                   help="after the tables, profile these steps (e.g. 2304x16384:bf16:dense)")
    p.add_argument("--json", type=cli.out_file, default="bench.json",
                   help="where to write every row (default bench.json; its folder must exist)")
    args = p.parse_args(argv)
    what = args.what or ["train", "harvest", "onnx"]
    if set(what) - {"train", "harvest", "onnx"}:
        p.error(f"unknown section {sorted(set(what) - {'train', 'harvest', 'onnx'})[0]!r}: choose from train, harvest, onnx")
    if args.quick and (args.shapes or args.steps):
        p.error("--quick times its own small shape for one step; drop --shapes and --steps, or --quick")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if args.quick:
        shapes, batch, steps = [(32, 512)], 256, 1
    elif args.shapes:
        shapes = args.shapes
        batch, steps = 4096, args.steps or (10 if gpu else 3)
    else:
        shapes = ([(576, 16_384), (576, 65_536), (2304, 16_384), (2304, 65_536)] if gpu
                  else [(576, 4096), (576, 16_384), (2304, 4096), (2304, 16_384)])
        batch, steps = 4096, args.steps or (10 if gpu else 3)
    dtypes = ["float32", "bf16"] if gpu or args.quick else ["float32"]   # bf16 matmuls on this CPU are slow
    modes = [False] if args.no_compile else [False, True]
    result = {"machine": machine(device), "date": time.strftime("%Y-%m-%d"),
              "command": "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"machine: {result['machine']}\n")
    failures = []
    if "train" in what:
        result["train"] = bench_train(shapes, batch, steps, device, dtypes, modes, l0=8 if args.quick else 50)
        print_train_summary(result["train"])
        write(args.json, result)
        failures += [f"train {r['d_in']}x{r['d_sae']} {r['dtype']} {r['mode']} {r['path']}: {r['max_rel_diff']:.1e}"
                     for r in result["train"] if r.get("max_rel_diff", 0) > AGREE[r["dtype"]]]
    if "harvest" in what:
        result["harvest"] = (bench_harvest(16, 4, 1, device) if args.quick
                             else bench_harvest(128, 64 if gpu else 16, steps, device))
        print(), print_harvest(result["harvest"])
        failures += [f"harvest: {r['max_abs_diff']:.1e}" for r in result["harvest"] if r["max_abs_diff"] > 0]
    if "onnx" in what:
        onnx_shapes = [(64, 256)] if args.quick else [(576, 16_384), (2304, 16_384)]
        result["onnx"] = bench_onnx(onnx_shapes, 128 if args.quick else 4096, steps, device)
        print(), print_onnx(result["onnx"])
        failures += [f"onnx {r['device']} {r['graph']} {r['d_in']}x{r['d_sae']}: {r['max_rel_diff']:.1e}"
                     for r in result["onnx"] if r["max_rel_diff"] > r["tolerance"]]
    write(args.json, result)
    print(f"\nwrote {args.json}")
    for d_in, d_sae, dtype, path in args.profile:
        profile_step(d_in, d_sae, 128 if args.quick else 4096, dtype, path == "sparse", device)
    if failures:
        raise SystemExit("error: these paths disagree with the reference path, so their timings compare different "
                         "work: " + "; ".join(failures))
    return result


if __name__ == "__main__":
    main()
