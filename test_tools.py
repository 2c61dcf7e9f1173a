"""Tests for tools/: gpu_check.py's dry run takes every step on the CPU, and it names what a GPU run lacks;
mutation.py reads mutmut's diffs and forgets the verdicts of an edited function."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
CHECK = HERE / "tools" / "gpu_check.py"


def test_gpu_check_dry_run_passes_every_step_and_writes_its_table(tmp_path):
    run = subprocess.run([sys.executable, str(CHECK), "--dry-run", "--out", str(tmp_path / "check.md")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "check.md").read_text()
    assert table.startswith("# GPU check: a dry run on the CPU, not a GPU result")
    for step in ("the test suite", "train, kill, resume", "bench.py --quick", "ONNX float32 encoder", "ONNX fp16 encoder",
                 "ONNX top-k encoder"):
        assert f"| {step}" in table, step
    assert table.count("| passed |") == 6 and "bit-identical weights and logged losses" in table
    assert "fused Adam True, compiled loss" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_a_gpu_says_what_is_missing(tmp_path):
    run = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path / "check.md")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and not (tmp_path / "check.md").exists()
    assert "lacks a CUDA device that torch sees (or pass --dry-run)" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


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
    (tmp_path / "run" / "train").mkdir(parents=True)
    (tmp_path / "run" / "train" / "by_gpu.json").write_text('{"train.x_g__mutmut_2": 1}')
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "by_gpu.json").write_text('{"train.x_g__mutmut_1": 1}')
    mutation.main(["--gpu-in", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "train" / "by_gpu.json").read_text()) == {"train.x_g__mutmut_1": 1,
                                                                                    "train.x_g__mutmut_2": 1}


def test_gpu_check_names_the_failed_tests_of_a_suite_it_stops(tmp_path, monkeypatch):
    """A suite stopped at gpu_check's limit still says what passed and which tests failed so far."""
    sys.path.insert(0, str(HERE / "tools"))
    import gpu_check
    (tmp_path / "test_t.py").write_text("import time\n\ndef test_fails():\n    assert False\n\n"
                                        "def test_passes():\n    pass\n\ndef test_hangs():\n    time.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "DRY_TESTS", [str(tmp_path / "test_t.py")])
    monkeypatch.setattr(gpu_check, "SUITE_S", 6)
    ok, detail = gpu_check.run_suite(dry=True)
    assert not ok and detail.startswith("stopped after 6 s: 1 passed, 1 failed so far; ")
    assert detail.endswith("/test_t.py::test_fails") and "test_passes" not in detail and "test_hangs" not in detail
