"""The mutation run: mutmut 3 over the product, one file at a time, against that file's own tests.

    make mutation                      # every file below; or:
    .venv/bin/python tools/mutation.py jumprelu.py baselines.py
    .venv/bin/python tools/mutation.py --gpu-out gpu.json        # then, on a GPU machine:
    python tools/mutation.py --gpu-run gpu.json --out DIR         # then, back here, with DIR copied:
    .venv/bin/python tools/mutation.py --gpu-in DIR

A dev profile, not part of CI (several hours on two cores; docs/mutation.md has the times).
Each file is mutated in its own copy of the tracked tree under runs/mutation/<file>/, so mutmut's
cache of one file never meets another's. mutmut records which tests call each function and runs
only those, fastest first, stopping at the first failure; the selections below also leave out the
tests that take seconds each and only repeat what a faster test checks (bench, the real SmolLM2,
torchrun, SIGKILL).
Lines that only raise, print or exit with a message are not mutated: a changed word in a message
is not a changed behaviour. Nor are the scripts' argument declarations (add_argument): test_cli.py
fuzzes every command line, but in subprocesses, where mutmut cannot see which test ran what.
mutmut 3.8.1 mutates no decorated function either: the product's @torch.no_grad() and
@torch.compiler.disable functions are left out of the figures, and their tests run for the rest.
The figures go to runs/mutation/report.md with every survivor's diff; docs/mutation.md holds the
last run's kill rates, tools/mutation-survivors.md why each survivor is left.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESELECTED = ["test_harvest.py::test_offline_smollm2_layer6_residual",  # left out of the selections below
              "test_harvest.py::test_python_docs_is_real_english_and_deterministic",
              "test_reliability.py::test_sigkill_at_random_steps_then_resume_gives_bit_identical_weights",
              # reads the product's source for "pickle", which the mutated copy's allow_pickle mutants hold
              "test_reliability.py::test_nothing_is_unpickled_anywhere"]
TESTS = {  # the test files that hold each product file
    "jumprelu.py": ["test_jumprelu.py", "test_penalties.py", "test_anthropic.py", "test_sparse.py"],
    "penalties.py": ["test_penalties.py", "test_sparse.py", "test_train.py"],
    "anthropic.py": ["test_anthropic.py", "test_train.py"],
    "sparse.py": ["test_sparse.py", "test_penalties.py"],
    "sae_folder.py": ["test_sae_folder.py", "test_baselines.py", "test_formats.py", "test_reliability.py"],
    "baselines.py": ["test_baselines.py", "test_reliability.py"],
    "train.py": ["test_train.py", "test_reliability.py"],
    "evaluate.py": ["test_evaluate.py", "test_reliability.py"],
    "export.py": ["test_export.py", "test_reliability.py"],
    "acts.py": ["test_acts.py", "test_reliability.py", "test_harvest.py"],
}
# Functions with code that only a subprocess runs (torchrun's ranks): mutmut cannot trace those tests,
# so a mutant there that no in-process test kills is run here against them (JumpReLU, TopK and ReLU
# on two ranks, and two ranks whose default device is meta), named in the module the ranks import
# it as (train, baselines). The tests' one-process references run the mutant too, so only what
# differs under torchrun can kill it there: the functions below hold torchrun's branches, and a
# mutant of their one-process branches meets the in-process tests first.
DISTRIBUTED = "test_distributed.py::test_two_ranks_"
BY_SUBPROCESS = {"train.py": ("train", ["broadcast_", "average_gradients_", "all_mean", "any_rank", "join_group",
                                           "leave_group", "loss_functions", "train_step", "checkpoint", "train"],
                              [DISTRIBUTED + "match_one_process_to_float64_rounding",
                               DISTRIBUTED + "train_what_one_process_trains[topk-None]",
                               "test_distributed.py::test_the_ranks_keep_to_the_device_asked_for_whatever_torchs_default"]),
                 "baselines.py": ("baselines", ["TopKSAE.loss"],
                                  [DISTRIBUTED + "match_one_process_to_float64_rounding[topk-512]"])}
# Functions with code that only a GPU runs differently (a device, CUDA autocast's dtype, a
# synchronize): their mutants not killed here go with --gpu-out to a GPU machine, where --gpu-run
# runs each against the tests that run on CUDA (-k cuda: test_cuda.py and the "cuda" parameters).
GPU = {"sparse.py": ["_KeptPre.backward"], "export.py": ["session"],
       "evaluate.py": ["evaluate", "activation_metrics", "lm_metrics", "top_contexts"],
       "train.py": ["build", "open_data", "next_batch", "train_step", "Log.heldout", "matmul_ceiling", "train"]}
SERIAL = ["matmul_ceiling"]     # timed: their tests run alone on the GPU, after the rest
NOT_MUTATED = [r"^\s*raise \w+\(", r"^\s*print\(", r"^\s*sys\.exit\(", r"^\s*p\.error\(",
               r"^\s*\w+\.add_argument\(", r"^\s*help="]


def setup_cfg(path, tests):
    deselect = [t for t in DESELECTED if t.split("::")[0] in tests]
    # forkserver: a worker forked from a process whose torch thread pool has started can hang
    lines = ["[mutmut]", f"source_paths = {path}", "process_isolation = forkserver",
             "do_not_mutate_patterns ="]
    lines += [f"    {p}" for p in NOT_MUTATED]
    lines += ["also_copy ="] + [f"    {p}" for p in tracked_top_level() if p != path]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    lines += [f"    --deselect={t}" for t in deselect]
    return "\n".join(lines) + "\n"


def tracked():
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def tracked_top_level():
    return sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in tracked()})


def copy_tree(dest, fresh=True):
    if fresh and dest.exists():
        shutil.rmtree(dest)
    for name in tracked():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    node = ROOT / "examples/node/node_modules"
    if node.exists() and not (dest / "examples/node/node_modules").exists():  # for the Node example's test
        os.symlink(node, dest / "examples/node/node_modules")


def run_file(path, out, max_children, recheck=False):
    """Mutate `path` afresh; or, with `recheck`, bring the last run's copy up to date with the tree
    and run again only what may have changed: the mutants of edited functions, and (with the
    tests as they are now) every mutant the last run did not kill."""
    work = out / Path(path).stem
    copy_tree(work, fresh=not recheck)
    # mutmut maps tests to functions only when it has no map: a function mutated for the first time
    # (a decorator taken out) would have "no tests" under the old one
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    (work / "setup.cfg").write_text(setup_cfg(path, TESTS[path]))
    cmd = [sys.executable, "-m", "mutmut", "run"] + (["--max-children", str(max_children)] if max_children else [])
    # One thread per mutant and one mutant per core; hypothesis does not shrink a mutant's failure.
    env = dict(os.environ, OMP_NUM_THREADS="1", HYPOTHESIS_PROFILE="mutation")
    meta = work / "mutants" / f"{path}.meta"
    before = json.loads(meta.read_text())["hash_by_function_name"] if meta.exists() else {}
    subprocess.run(cmd, cwd=work, env=env, check=False)
    drop_edited(work, before, json.loads(meta.read_text())["hash_by_function_name"])
    if recheck:
        left = [k for k, s in results(path, out, diffs=False)[0].items() if s != "killed"]
        if left:
            subprocess.run(cmd + left, cwd=work, env=env, check=False)
    if path in BY_SUBPROCESS:
        run_by_subprocess(path, out, env)


def drop_edited(work, before, after):
    """mutmut forgets the verdicts of a function whose code changed (its mutants are new ones under
    the old names); so do by_subprocess.json and by_gpu.json."""
    edited = {f for f, h in after.items() if before.get(f) != h}
    for extra in (work / "by_subprocess.json", work / "by_gpu.json"):
        if extra.exists():
            codes = json.loads(extra.read_text())
            kept = {k: c for k, c in codes.items() if mangled(k) not in edited}
            extra.write_text(json.dumps(kept, indent=1))


def run_by_subprocess(path, out, env):
    """Each mutant of BY_SUBPROCESS's functions that no test has killed yet, against the subprocess
    tests; the exit codes go to by_subprocess.json, which results() lays over mutmut's."""
    module, functions, tests = BY_SUBPROCESS[path]
    work = out / Path(path).stem
    done_file = work / "by_subprocess.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    todo = not_killed(path, out, functions)
    for i, key in enumerate(todo):
        run = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                               cwd=work / "mutants", env=dict(env, MUTANT_UNDER_TEST=f"{module}.{key.split('.', 1)[1]}"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            done[key] = run.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, 9)
            done[key] = 36                                  # mutmut's code for a timeout
        done_file.write_text(json.dumps(done, indent=1))
        print(f"{path}: {i + 1}/{len(todo)} by subprocess, {key}: {done[key]}", flush=True)


def mangled(key):
    """"train.xǁLogǁheldout__mutmut_3" -> "xǁLogǁheldout", mutmut's name of the function."""
    return key.split(".", 1)[1].split("__mutmut_")[0]


def function_of(key):
    """"train.x_build__mutmut_3" -> "build"; "train.xǁLogǁheldout__mutmut_3" -> "Log.heldout"."""
    name = mangled(key)
    return name[2:] if name.startswith("x_") else name[2:].replace("ǁ", ".")


def not_killed(path, out, functions):
    """The mutants of `functions` in `path` that have run and that no test has killed so far."""
    return [k for k, s in sorted(results(path, out, diffs=False)[0].items())
            if s not in ("killed", "not checked") and function_of(k) in functions]


def edits(diff):
    """The (old, new) text of each hunk of `mutmut show`'s diff of one function."""
    hunks, out = [], []
    for line in diff.splitlines():
        if line.startswith("@@"):
            hunks.append(([], []))
        elif hunks and line[:1] in " -+" and not line.startswith(("---", "+++")):
            for side, sign in zip(hunks[-1], "-+"):
                if line[:1] in (" ", sign):
                    side.append(line[1:])
    for old, new in hunks:
        out.append(("\n".join(old) + "\n", "\n".join(new) + "\n"))
    return out


def apply(key, source, hunks):
    """`source` with each (old, new) hunk applied. mutmut shows a method's code dedented to
    the top level but a docstring as it is, so a hunk is tried whole, then without the lines that
    old and new share at either end, each as it is and indented once."""
    for old, new in hunks:
        a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
        while a and b and a[0] == b[0]:
            a, b = a[1:], b[1:]
        while a and b and a[-1] == b[-1]:
            a, b = a[:-1], b[:-1]
        tries = [(textwrap.indent(o, pad), textwrap.indent(n, pad)) for o, n in ((old, new), ("".join(a), "".join(b)))
                 for pad in ("", "    ")]
        found = next(((o, n) for o, n in tries if o and source.count(o) == 1), None)
        assert found, f"{key}: the edit does not apply"
        source = source.replace(*found)
    return source


def gpu_out(out, dest):
    """The GPU functions' mutants not killed so far, as {file, key, edits}, for --gpu-run."""
    todo = []
    for path, functions in GPU.items():
        if (out / Path(path).stem / "mutants" / f"{path}.meta").exists():
            todo += [{"file": path, "key": k, "edits": edits(show(out / Path(path).stem, k))}
                     for k in not_killed(path, out, functions)]
    dest.write_text(json.dumps(todo, indent=1))
    print(f"{len(todo)} mutants to run on a GPU: {dest}")


def gpu_run(todo_file, out, workers=8):
    """On a GPU machine, without mutmut: each mutant of `todo_file` applied to its own copy of the
    tree and run against its file's tests that run on CUDA; the exit codes go to out/by_gpu.json
    ({mutant: code}), which --gpu-in adds to each file's. The unmutated tree first: each of those
    tests must pass there."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    todo = json.loads(Path(todo_file).read_text())
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "node_modules", ".*")

    def run(name, item, mutate=True):
        tree = Path(tempfile.gettempdir()) / "gpu_mutants" / name
        shutil.copytree(ROOT, tree, ignore=ignore, dirs_exist_ok=True)
        if mutate:
            (tree / item["file"]).write_text(apply(item["key"], (tree / item["file"]).read_text(), item["edits"]))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "cuda",
               *TESTS[item["file"]], "test_cuda.py"]
        try:
            return subprocess.run(cmd, cwd=tree, env=dict(os.environ, HYPOTHESIS_PROFILE="mutation"),
                                  capture_output=True, text=True, timeout=300).returncode
        except subprocess.TimeoutExpired:
            return 36                                       # mutmut's code for a timeout

    codes = {}
    out.mkdir(parents=True, exist_ok=True)

    def record(item, code):                             # written as they come: a run cut short keeps its codes
        codes[item["key"]] = code
        (out / "by_gpu.json").write_text(json.dumps(codes, indent=1))
        print(f"{item['key']}: {code}", flush=True)

    serial = [m for m in todo if function_of(m["key"]) in SERIAL]
    pooled = [m for m in todo if m not in serial]
    with ThreadPoolExecutor(workers) as pool:
        jobs = {pool.submit(run, f"unmutated-{Path(f).stem}", {"file": f}, False): None for f in {m["file"] for m in todo}}
        jobs.update({pool.submit(run, str(i), m): m for i, m in enumerate(pooled)})
        for job in as_completed(jobs):
            if jobs[job] is None and job.result() != 0:
                pool.shutdown(wait=False, cancel_futures=True)
                sys.exit("error: the CUDA tests fail on the unmutated tree; no mutant's result would mean anything.")
            if jobs[job] is not None:
                record(jobs[job], job.result())
    for i, item in enumerate(serial):                   # alone: the pool shares the GPU's time
        record(item, run(f"serial{i}", item))
    print(f"{sum(c != 0 for c in codes.values())} of {len(codes)} killed on the GPU: {out / 'by_gpu.json'}")


def gpu_in(run_dir, out):
    """A GPU run's codes (run_dir/by_gpu.json) added to the earlier ones of each file (its file holds
    only the mutants it was given); a mutant's key starts with its module's name."""
    new = json.loads((Path(run_dir) / "by_gpu.json").read_text())
    for stem in sorted({k.split(".")[0] for k in new}):
        dest = out / stem / "by_gpu.json"
        codes = json.loads(dest.read_text()) if dest.exists() else {}
        merged = {**codes, **{k: c for k, c in new.items() if k.split(".")[0] == stem}}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(merged, indent=1))
        print(f"{dest}: {len(codes)} codes, now {len(merged)}")


def results(path, out, diffs=True):
    """{mutant: status} of the last run of `path`, and the diff of each mutant not killed."""
    from mutmut.stats import status_by_exit_code
    work = out / Path(path).stem
    meta = json.loads((work / "mutants" / f"{path}.meta").read_text())
    codes = dict(meta["exit_code_by_key"])
    for extra in ("by_subprocess.json", "by_gpu.json"):        # run_by_subprocess's, gpu_run's: a kill counts
        if (work / extra).exists():
            codes.update({k: c for k, c in json.loads((work / extra).read_text()).items()
                          if status_by_exit_code[codes.get(k)] != "killed"})
    status = {k: status_by_exit_code[v] for k, v in codes.items()}
    return status, {k: show(work, k) for k, s in status.items() if s not in ("killed", "not checked") and diffs}


def show(work, key):
    """mutmut's diff of one mutant."""
    return subprocess.run([sys.executable, "-m", "mutmut", "show", key], cwd=work, capture_output=True,
                          text=True).stdout


def report(out):
    """Per-file kill rates of every file run so far, and every mutant not killed with its diff."""
    rows, survivors = [], []
    for path in TESTS:
        if not (out / Path(path).stem / "mutants" / f"{path}.meta").exists():
            continue
        status, diffs = results(path, out)
        count = {s: sum(v == s for v in status.values()) for s in set(status.values())}
        killed = count.get("killed", 0)
        rows.append(f"| {path} | {len(status)} | {killed} | {count.get('survived', 0)} | "
                    f"{count.get('no tests', 0)} | {count.get('timeout', 0)} | {killed / len(status):.1%} |")
        survivors += [f"### {k} ({status[k]})\n```diff\n{diffs[k].strip()}\n```" for k in sorted(diffs)]
    table = ["| file | mutants | killed | survived | no tests | timeout | kill rate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"] + rows
    (out / "report.md").write_text("\n".join(table + ["", "## Not killed", ""] + survivors) + "\n")
    print("\n".join(table) + f"\n\nevery mutant not killed, with its diff: {out / 'report.md'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", metavar="FILE", help=f"the files to mutate (default: all of {', '.join(TESTS)})")
    p.add_argument("--out", type=Path, default=ROOT / "runs/mutation", help="where the copies go")
    p.add_argument("--max-children", type=int, default=None, help="mutants run at once (default: cores)")
    p.add_argument("--recheck", action="store_true",
                   help="after editing tests or code: rerun only edited functions and the mutants not killed")
    p.add_argument("--report", action="store_true", help="only write the report of the files run so far")
    p.add_argument("--gpu-out", type=Path, metavar="JSON",
                   help="write the GPU functions' mutants not killed here to JSON, for --gpu-run")
    p.add_argument("--gpu-run", type=Path, metavar="JSON",
                   help="on a GPU machine (mutmut not needed): run JSON's mutants, codes to OUT/by_gpu.json")
    p.add_argument("--gpu-in", type=Path, metavar="DIR",
                   help="add a --gpu-run's DIR/by_gpu.json to OUT/<file>/by_gpu.json")
    a = p.parse_args(argv)
    if a.gpu_run:
        return gpu_run(a.gpu_run, a.out)
    if a.gpu_in:
        return gpu_in(a.gpu_in, a.out)
    if set(a.files) - set(TESTS):
        p.error(f"{', '.join(sorted(set(a.files) - set(TESTS)))} is not one of {', '.join(TESTS)}.")
    if importlib.util.find_spec("mutmut") is None:
        sys.exit("error: mutmut is not installed; pip install mutmut==3.8.1, or run make mutation.")
    if a.gpu_out:
        return gpu_out(a.out, a.gpu_out)
    for path in [] if a.report else a.files or list(TESTS):
        run_file(path, a.out, a.max_children, a.recheck)
    report(a.out)


if __name__ == "__main__":
    main()
