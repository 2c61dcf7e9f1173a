"""Tests for tools/: gpu_check.py's rehearsal runs every stage on the CPU and writes a GPU run's files, a GPU
run on a machine without one skips what needs it; mutation.py reads mutmut's diffs and forgets the verdicts
of an edited function."""

import argparse
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
CHECK = HERE / "tools" / "gpu_check.py"


def test_gpu_check_rehearsal_runs_every_stage_and_writes_the_gpu_runs_files(tmp_path):
    """--rehearse: every stage on the CPU, small, and the files a GPU run writes, under 8 and at most two
    folders deep (what comes back from the GPU machine): the summary's table holds check.json's numbers."""
    run = subprocess.run([sys.executable, str(CHECK), "--rehearse", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == [
        "by_gpu.json", "check.json", "junit/cuda.xml", "junit/suite.xml", "log.txt", "summary.md"]
    check = json.loads((out / "check.json").read_text())
    assert list(check["stages"]) == ["probe", "cuda", "train", "suite", "mutants"] and check["rehearsal"]
    assert {s["status"] for s in check["stages"].values()} == {"passed"}
    cuda, train, suite = check["stages"]["cuda"], check["stages"]["train"], check["stages"]["suite"]
    assert cuda["skipped"] > 0 and cuda["passed"] == 0          # no GPU: test_cuda.py's tests skip, each named
    assert suite["passed"] > 0 and suite["failed"] == 0 and not suite["failed_tests"]
    assert [(r["run"], r["d_sae"]) for r in train["runs"]] == [(run, d) for d in (256, 1024)
                                                               for run in ("defaults", "eager dense")]
    assert all(len(r["paths"]) == len(r["tokens_per_s"]) == 64 // 8 and r["exit"] == 0 for r in train["runs"])
    assert {r["recompiles"] for r in train["runs"]} == {0} and train["kill_and_resume"]["identical"]
    assert check["stages"]["mutants"]["control"] == 0 and json.loads((out / "by_gpu.json").read_text()) == {}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check: a rehearsal on the CPU, small, not a GPU result")
    for name, stage in check["stages"].items():
        assert f"| {name} | passed | {stage['seconds']:.0f} |" in summary
    cases = [c.get("name") for c in ET.parse(out / "junit" / "cuda.xml").getroot().iter("testcase")]
    assert len(cases) == cuda["skipped"] and "test_matmul_ceiling_times_the_gpus_work_not_its_launch" in cases
    assert "killed" in (out / "log.txt").read_text()


def test_gpu_check_without_a_gpu_fails_its_probe_skips_the_gpu_stages_and_runs_the_rest(tmp_path, monkeypatch):
    """Run for a GPU on a machine without one: each stage that needs it is skipped with the reason, and the
    script goes on to the others (the suite, replaced here) before it exits non-zero."""
    sys.path.insert(0, str(HERE / "tools"))
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "suite", lambda ctx: {"status": "passed", "detail": "ran"})
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    stages = json.loads((tmp_path / "check.json").read_text())["stages"]
    assert stages["probe"]["status"] == "failed" and stages["probe"]["detail"].endswith("torch sees no GPU")
    assert all(stages[s] | {"seconds": 0} == {"status": "skipped", "detail": "torch sees no CUDA device", "seconds": 0,
                                                "cap_s": gpu_check.CAPS[s]} for s in ("cuda", "train", "mutants"))
    assert stages["suite"]["detail"] == "ran" and "FAILED (probe)" in (tmp_path / "summary.md").read_text()


def test_gpu_check_leaves_out_tests_that_exist():
    """The tests it leaves out where a package is missing are named as they are (a rename would run them)."""
    sys.path.insert(0, str(HERE / "tools"))
    import gpu_check
    for test in (t for tests in gpu_check.NEEDS.values() for t in tests):
        path, name = test.split("::")
        assert f"\ndef {name}(" in (HERE / path).read_text(), test


def test_gpu_check_names_the_tests_of_a_pytest_it_stops_at_the_cap(tmp_path):
    """A pytest stage stopped at its cap (SIGINT) still writes its JUnit XML: what passed, and which failed.
    The cap here falls once the third test has begun, and that test would hang for a minute."""
    sys.path.insert(0, str(HERE / "tools"))
    import gpu_check
    (tmp_path / "test_t.py").write_text(f"import time\n\ndef test_fails():\n    assert False\n\n"
                                        f"def test_passes():\n    pass\n\ndef test_hangs():\n"
                                        f"    open({str(tmp_path / 'began')!r}, 'w').close()\n    time.sleep(60)\n")
    (tmp_path / "junit").mkdir()

    class Stage(argparse.Namespace):
        deadline = property(lambda self: 0 if (tmp_path / "began").exists() else math.inf)

    with open(tmp_path / "log.txt", "w") as log:
        result = gpu_check.pytest(Stage(out=tmp_path, lacks=[], log=log), "suite", [str(tmp_path / "test_t.py")])
    assert result["status"] == "stopped" and (result["passed"], result["failed"]) == (1, 1)
    (failed,) = result["failed_tests"]                # named from pytest's rootdir, which depends on where it runs
    assert failed.endswith("test_t.py::test_fails") and "stopped at the cap" in result["detail"]


def test_gpu_check_tells_a_resumed_run_that_differs_by_one_bit(tmp_path):
    """identical(): the same weights bit for bit and the same logged losses, or not."""
    sys.path.insert(0, str(HERE / "tools"))
    import gpu_check
    from safetensors.numpy import save_file
    w = {"W_enc": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    for name, weights, loss in (("a", w, 0.5), ("b", w, 0.5), ("c", {"W_enc": w["W_enc"].copy()}, 0.5), ("d", w, 0.25)):
        (tmp_path / name).mkdir()
        save_file(weights, str(tmp_path / name / "sae.safetensors"))
        (tmp_path / name / "log.jsonl").write_text(json.dumps({"step": 1, "loss": loss}) + "\n")
    save_file({"W_enc": np.nextafter(w["W_enc"], 2, dtype=np.float32) * (np.arange(12) == 5).reshape(3, 4)
               + w["W_enc"] * (np.arange(12) != 5).reshape(3, 4)}, str(tmp_path / "c" / "sae.safetensors"))
    assert gpu_check.identical(tmp_path / "a", tmp_path / "b")
    assert not gpu_check.identical(tmp_path / "a", tmp_path / "c") and not gpu_check.identical(tmp_path / "a", tmp_path / "d")
    assert not gpu_check.identical(tmp_path / "a", tmp_path / "missing")


def test_mutation_tool_reads_a_mutants_function_and_edit_from_mutmuts_diff():
    """tools/mutation.py --gpu-out: the function a mutant's key names, and the (old, new) text of its
    diff, applied as --gpu-run applies it to a copy of the tree."""
    sys.path.insert(0, str(HERE / "tools"))
    import mutation
    assert mutation.function_of("train.x_build__mutmut_37") == "build"
    assert mutation.function_of("train.xǁLogǁheldout__mutmut_3") == "Log.heldout"
    diff = ("# train.x_next_batch__mutmut_2: survived\n--- train.py\n+++ train.py\n@@ -1,3 +1,3 @@\n"
            " def f(stream):\n-    return next(stream).to(device)\n+    return next(stream).to(None)\n     # end\n")
    assert mutation.edits(diff) == [("def f(stream):\n    return next(stream).to(device)\n    # end\n",
                                      "def f(stream):\n    return next(stream).to(None)\n    # end\n")]

    method = ('class A:\n    def f(self, x):\n        """Doc,\n        two lines."""\n        y = x + 1\n'
              '        return y\n')
    shown = ("@@ -1,5 +1,5 @@\n def f(self, x):\n     \"\"\"Doc,\n         two lines.\"\"\"\n-    y = x + 1\n+    y = x - 1\n"
             "     return y\n")          # mutmut's view of a method: its code dedented, its docstring as it is
    assert mutation.apply("k", method, mutation.edits(shown)) == method.replace("x + 1", "x - 1")
    with pytest.raises(AssertionError, match="k: the edit does not apply"):
        mutation.apply("k", method.replace("x + 1", "x + 2"), mutation.edits(shown))


def test_mutation_tool_adds_a_gpu_runs_verdicts_and_forgets_those_of_an_edited_function(tmp_path):
    """--gpu-in adds a GPU run's codes to the earlier ones; and, as mutmut does for its own, the codes of
    a function whose code changed are dropped (its mutants are new ones under the old names)."""
    sys.path.insert(0, str(HERE / "tools"))
    import mutation
    (tmp_path / "by_subprocess.json").write_text('{"train.x_f__mutmut_1": 1, "train.xǁLogǁg__mutmut_2": 1, '
                                                 '"train.x_f2__mutmut_3": 0}')
    (tmp_path / "by_gpu.json").write_text('{"train.x_f__mutmut_4": 1}')
    mutation.drop_edited(tmp_path, {"x_f": "a", "xǁLogǁg": "b", "x_f2": "c"}, {"x_f": "A", "xǁLogǁg": "b", "x_f2": "c"})
    assert json.loads((tmp_path / "by_subprocess.json").read_text()) == {"train.xǁLogǁg__mutmut_2": 1,
                                                                         "train.x_f2__mutmut_3": 0}
    assert json.loads((tmp_path / "by_gpu.json").read_text()) == {}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "by_gpu.json").write_text('{"train.x_g__mutmut_2": 1, "export.x_session__mutmut_1": 0}')
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "by_gpu.json").write_text('{"train.x_g__mutmut_1": 1}')
    mutation.main(["--gpu-in", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "train" / "by_gpu.json").read_text()) == {"train.x_g__mutmut_1": 1,
                                                                                    "train.x_g__mutmut_2": 1}
    assert json.loads((tmp_path / "out" / "export" / "by_gpu.json").read_text()) == {"export.x_session__mutmut_1": 0}
