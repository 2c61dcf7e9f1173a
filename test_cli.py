"""Every script's command line: a mistake ends in one line and a non-zero exit, before any model
or data loads, with nothing written.

    python -m pytest test_cli.py                              # CI profile: 3,480 vectors, about 30 s
    HYPOTHESIS_PROFILE=dev python -m pytest test_cli.py --hypothesis-show-statistics   # 87,000

The fuzz test starts each script from a valid command and breaks it: for every way (an argument
that can take a wrong value, an unknown option, a required argument left out, settings that
contradict each other: 87 pairs of script and way) it draws vectors broken that way and in up to
two more. Wrong values come from the argument's own kind: numbers out of range or not numbers at
all, empty and missing paths, a text file, a folder or an ONNX file where something else goes,
outputs that cannot be written (/proc, under a file, in a missing folder), unknown choices. It
runs main(argv) in-process with the function that would load the model (or train, or time)
replaced by one that fails the test: every vector must be refused before it. The hand-written
cases below are values that were once silently bent or taken to mean the default.
"""

import errno
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import acts
import bench
import evaluate
import export
import formats
import frontier
import harvest
import infer_onnx
import jumprelu
import sae_folder
import train

HERE = Path(__file__).parent
FUZZ = settings(deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Reached(Exception):
    """Raised where the script would load its model, train or time: the vector was accepted."""


def reached(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files the vectors point at: an activation folder (its manifest alone), an SAE folder, its
    ONNX export, activations right and wrong, a text corpus, and things that are none of these."""
    w = tmp_path_factory.mktemp("cli")
    settings_ = dict(model="m", gguf_file=None, layer=1, site="resid", context=16, dtype="float32",
                     heldout_every=5, source={"text": "t"})
    (w / "acts").mkdir()
    acts.write_manifest(w / "acts", acts.new_manifest(settings_, "model.layers.1", 6))
    sae = jumprelu.JumpReLUSAE(6, 12)
    sae_folder.save(sae, w / "sae")
    export.export(sae, w / "sae.onnx")
    import onnx                                      # an ONNX model that is not an SAE
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 6])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 6])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)]), w / "identity.onnx")
    (w / "empty.onnx").write_bytes(b"")
    for name, array in {"x": np.ones((4, 6), np.float32), "wide": np.ones((4, 7), np.float32), "int": np.ones((4, 6), int),
                        "flat": np.ones(6, np.float32), "scalar": np.float32(1), "no_rows": np.ones((0, 6), np.float32)}.items():
        np.save(w / f"{name}.npy", array)
    np.save(w / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    np.savez(w / "arrays.npz", x=np.ones((4, 6), np.float32))
    (w / "notes.txt").write_text("not what was asked for\n")
    (w / "corpus").mkdir()
    (w / "corpus" / "a.txt").write_text("Some text to harvest. " * 50)
    for folder in ("empty", "results", "cwd"):
        (w / folder).mkdir()
    return w


# --- What each kind of argument can be, right and wrong ------------------------------------------------

NOT_NUMBERS = st.sampled_from(["", " ", "x", "ten", "nan", "inf", "-inf", "1e400", "0x10", "2,000", "1/2", "5%"])


def good_int(low):
    return st.integers(low, 10**6).map(lambda v: [str(v)])


def bad_int(low):
    """Not a whole number >= low: smaller ones, fractions, and text that is no number."""
    fractions = st.one_of(st.floats(max_value=low - 1, allow_nan=False), st.integers(-10**6, 10**6).map(lambda i: i + 0.5))
    return st.one_of(st.integers(max_value=low - 1).map(str), fractions.map(repr), NOT_NUMBERS).map(lambda v: [v])


GOOD_POSITIVE = st.floats(1e-6, 1e6).map(lambda v: [repr(v)])
BAD_POSITIVE = st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr), NOT_NUMBERS).map(lambda v: [v])
GOOD_FRACTION = st.floats(0.0, 1.0).map(lambda v: [repr(v)])
BAD_FRACTION = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9), NOT_NUMBERS).map(lambda v: [str(v)])


def several(good, bad):
    """nargs="+": a list of good values, or one in which at least one is bad."""
    goods = st.lists(good, min_size=1, max_size=3).map(lambda vs: sum(vs, []))
    bads = st.tuples(goods, bad, st.integers(0, 3)).map(lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    return goods, bads


def choice(options):
    return st.sampled_from(options).map(lambda v: [v]), st.sampled_from(["", "none", "x", options[0].upper(),
                                                                          options[0] + " "]).map(lambda v: [v])


def paths(w, *names):
    return st.sampled_from([str(w / n) if n else "" for n in names]).map(lambda v: [v])


def missing(w):
    """A path under a folder that does not exist."""
    return st.text("abcxyz_-. 0123456789", min_size=1, max_size=8).map(lambda t: [str(w / "missing" / t)])


# kind: optional, required, always (given though optional), positional; excludes: an option it cannot go with
Arg = namedtuple("Arg", "good bad kind excludes", defaults=("optional", None))
FLAG = Arg(st.just([]), None)
DEVICE = Arg(st.just(["cpu"]), st.sampled_from(["", "gpu", "cuda:99", "tpu", "cpu:x", "CPU"]).map(lambda v: [v]))


def script(w, name):
    """(main, the functions the vector must not reach, {option: Arg}, invalid combinations)."""
    acts_good, sae_good = paths(w, "acts"), paths(w, "sae")
    acts_bad = st.one_of(paths(w, "sae", "notes.txt", "empty", "x.npy", ""), missing(w))
    sae_bad = st.one_of(paths(w, "notes.txt", "sae.onnx", "acts", "empty", "x.npy", ""), missing(w))
    folder_bad = st.one_of(paths(w, "", "notes.txt", "notes.txt/sub", "x.npy"),
                           st.sampled_from(["/proc/out", "/proc/self/out", "/sys/out"]).map(lambda v: [v]))
    file_bad = st.one_of(paths(w, "", ".", "empty", "missing/out.json", "notes.txt/out.json"),
                         st.sampled_from(["/proc/out.json", "/sys/out.json", "/"]).map(lambda v: [v]))
    new_folder, new_file = paths(w, "new/run"), paths(w, "new.json")
    positive, count = (good_int(1), bad_int(1)), (good_int(0), bad_int(0))
    if name == "train":
        target = several(GOOD_POSITIVE, BAD_POSITIVE)
        args = {"--acts": Arg(acts_good, acts_bad, "required"), "--out": Arg(new_folder, folder_bad, "required"),
                "--arch": Arg(*choice(list(train.ARCHITECTURES))), "--d-sae": Arg(*positive), "--steps": Arg(*positive),
                "--target-l0": Arg(*target), "--l0-coefficient": Arg(*target, excludes="--target-l0"), "--recipe": Arg(*choice(["small", "paper"])),
                "--sparsity": Arg(*choice(["l0", "target_batch", "target_row", "tanh"])), "--lr": Arg(GOOD_POSITIVE, BAD_POSITIVE),
                "--batch-size": Arg(*positive), "--bandwidth": Arg(GOOD_POSITIVE, BAD_POSITIVE),
                "--threshold-lr-scale": Arg(GOOD_POSITIVE, BAD_POSITIVE), "--lr-warmup-steps": Arg(*count),
                "--l0-warmup-steps": Arg(*count), "--lr-decay-fraction": Arg(GOOD_FRACTION, BAD_FRACTION),
                "--seed": Arg(*count), "--log-every": Arg(*positive), "--checkpoint-every": Arg(*positive),
                "--resume": FLAG, "--device": DEVICE, "--path": Arg(*choice(["auto", "dense", "sparse"])), "--compile": FLAG}
        combos = [{"--arch": ["topk"], "--target-l0": ["2.5"]}, {"--arch": ["relu"], "--bandwidth": ["0.1"]},
                  {"--d-sae": ["4"], "--target-l0": ["8"]}, {"--l0-coefficient": ["1e-3"], "--sparsity": ["target_row"]},
                  {"--arch": ["gated"], "--path": ["sparse"]}, {"--target-l0": ["4"], "--l0-coefficient": ["1"]},
                  {"--recipe": ["paper"], "--target-l0": ["8"]}, {"--sparsity": ["tanh"], "--path": ["sparse"]}]
        return train.main, [(train, "train")], args, combos
    if name == "harvest":
        args = {"--out": Arg(new_folder, st.one_of(folder_bad, paths(w, "acts")), "required"),   # acts: a harvest already
                "--tokens": Arg(*positive), "--layer": Arg(*count), "--site": Arg(*choice(list(harvest.SITES))),
                "--text": Arg(*several(paths(w, "corpus", "corpus/a.txt"), st.one_of(paths(w, "empty", ""), missing(w))),
                              "always"),
                "--dataset-column": Arg(st.just(["text"]), st.sampled_from(["content", ""]).map(lambda v: [v])),
                "--context": Arg(good_int(2), bad_int(2)), "--batch-size": Arg(*positive),
                "--dtype": Arg(*choice(["float16", "float32"])), "--heldout-every": Arg(good_int(2), bad_int(2)),
                "--shard-rows": Arg(*positive), "--device": DEVICE}
        combos = [{"--tokens": ["100"], "--context": ["128"]}, {"--tokens": ["2e3"], "--heldout-every": ["10000"]},
                  {"--dataset": ["some/dataset"]}]
        return harvest.main, [(harvest, "load_model")], args, combos
    if name == "evaluate":
        args = {"sae_dirs": Arg(*several(sae_good, sae_bad), "positional"), "--acts": Arg(acts_good, acts_bad, "required"),
                "--lm": FLAG, "--lm-windows": Arg(*positive), "--json": Arg(new_file, file_bad),
                "--plot": Arg(new_folder, folder_bad), "--device": DEVICE,
                "--latents": Arg(st.sampled_from(["0", "1,2", "3, 4"]).map(lambda v: [v]),
                                 st.sampled_from(["", "a", "1,,2", "-1", "1.5", "1;2", "2,-3"]).map(lambda v: [v]))}
        return evaluate.main, [(evaluate, "evaluate")], args, []
    if name == "export":
        args = {"sae_dir": Arg(sae_good, sae_bad, "positional"), "--out": Arg(paths(w, "new.onnx"), file_bad, "required"),
                "--what": Arg(*choice(["encoder", "sae"])), "--fp16": FLAG, "--topk": Arg(*positive),
                "--acts": Arg(acts_good, acts_bad), "--tol": Arg(GOOD_POSITIVE, BAD_POSITIVE)}
        return export.main, [(export, "load_sae")], args, []
    if name == "infer_onnx":
        onnx_bad = st.one_of(paths(w, "notes.txt", "identity.onnx", "empty.onnx", "x.npy", "sae", "empty", ""), missing(w))
        npy_bad = st.one_of(paths(w, "wide.npy", "int.npy", "notes.txt", "flat.npy", "scalar.npy", "no_rows.npy",
                                  "objects.npy", "arrays.npz", "sae.onnx", "empty", ""), missing(w))
        args = {"onnx_file": Arg(paths(w, "sae.onnx"), onnx_bad, "positional"),
                "activations": Arg(paths(w, "x.npy"), npy_bad, "positional"), "--rows": Arg(*count), "--top": Arg(*positive)}
        return infer_onnx.main, [], args, []
    if name == "formats":
        args = {"src": Arg(sae_good, sae_bad, "positional"), "--out": Arg(new_folder, folder_bad, "required"),
                "--saelens": FLAG}
        return formats.main, [(formats, "load_sae")], args, []
    if name == "frontier":
        args = {"--acts": Arg(acts_good, acts_bad, "required"), "--out": Arg(new_folder, folder_bad, "required"),
                "--results": Arg(paths(w, "results/f"), file_bad, "always"),
                "--archs": Arg(*several(*choice(list(train.ARCHITECTURES)))),
                "--targets": Arg(st.just(["25"]), several(*positive)[1]), "--seeds-at": Arg(st.just(["25"]), several(*positive)[1]),
                "--seeds-steps": Arg(st.just(["250"]), several(*positive)[1]), "--seeds": Arg(*positive), "--d-sae": Arg(*positive), "--steps": Arg(*several(*positive)),
                "--lm-windows": Arg(*positive), "--lrs": Arg(*several(GOOD_POSITIVE, BAD_POSITIVE)), "--sweep-at": Arg(*positive),
                "--device": DEVICE}
        combos = [{"--targets": ["5"], "--seeds-at": ["6"]}, {"--steps": ["5"], "--seeds-steps": ["6"]}, {"--targets": ["3000"], "--seeds-at": ["3000"], "--d-sae": ["100"]},
                  {"--targets": ["5"], "--sweep-at": ["3000"], "--d-sae": ["100"]}]
        return frontier.main, [(frontier, "train_all")], args, combos
    if name == "bench":
        shape = st.sampled_from(["576x4096", "32x64"]).map(lambda v: [v])
        args = {"what": Arg(st.lists(st.sampled_from(["train", "harvest", "onnx"]), max_size=3),
                            st.sampled_from(["all", "Train", "ONNX", "x"]).map(lambda v: [v]), "positional"),
                "--quick": FLAG, "--device": DEVICE,
                "--shapes": Arg(*several(shape, st.sampled_from(["", "576", "0x64", "ax1", "1x2x3", "64x-1"]).map(lambda v: [v]))),
                "--steps": Arg(*positive), "--no-compile": FLAG,
                "--profile": Arg(*several(st.sampled_from(["32x64:float32:dense", "32x64:bf16:sparse"]).map(lambda v: [v]),
                                          st.sampled_from(["32x64:fp8:dense", "32x64:bf16", "x:bf16:dense", "", "32x64:bf16:other",
                                                           "0x64:float32:dense"]).map(lambda v: [v]))),
                "--json": Arg(new_file, file_bad, "always")}
        combos = [{"--quick": [], "--shapes": ["576x4096"]}, {"--quick": [], "--steps": ["3"]}]
        return bench.main, [(bench, f) for f in ("bench_train", "bench_harvest", "bench_onnx", "profile_step")], args, combos
    raise KeyError(name)


SCRIPTS = ["train", "harvest", "evaluate", "export", "infer_onnx", "formats", "frontier", "bench"]
UNKNOWN = st.sampled_from(["--nope", "--zzz=1", "-z", "--out-dir", "--help-me", "---"]).map(lambda v: [v])


def needed(args):
    return [n for n, a in args.items() if a.kind in ("required", "positional") and n != "what"]   # bench's may be left out


def ways(args, combos):
    """The ways a vector can be broken: each argument that can take a wrong value, an unknown option,
    a required argument left out, a contradiction between settings."""
    return ([n for n, a in args.items() if a.bad is not None] + ["unknown option"] + ["left out"] * bool(needed(args))
            + ["contradiction"] * bool(combos))


@st.composite
def invalid_argv(draw, args, combos, first):
    """A valid command broken in the way `first`, and in up to two more ways."""
    others = [w for w in ways(args, combos) if w != first]
    broken = [first] + draw(st.lists(st.sampled_from(others), max_size=2, unique=True))
    values, extra = {}, []
    for way in broken:
        if way == "unknown option":
            extra.append(draw(UNKNOWN))
        elif way == "left out":
            values[draw(st.sampled_from(needed(args)))] = None
        elif way == "contradiction":
            values.update(draw(st.sampled_from(combos)))
        else:
            values[way] = draw(args[way].bad)
    for n, a in args.items():              # the required ones, and each other one a time in four
        if n not in values and (a.kind != "optional" or draw(st.integers(0, 3)) == 3) and a.excludes not in values:
            values[n] = draw(a.good)
    positionals = [values[n] for n, a in args.items() if a.kind == "positional" and values.get(n) is not None]
    options = [[n, *v] for n, v in values.items() if v is not None and (n not in args or args[n].kind != "positional")]
    return sum(positionals, []) + sum(draw(st.permutations(options + extra)), [])


def files_under(folder):
    return sorted(str(Path(root, f)) for root, dirs, files in os.walk(folder) for f in files + dirs)


CASES = [(name, way) for name in SCRIPTS for way in ways(*script(Path("W"), name)[2:])]     # 87 pairs


@pytest.mark.parametrize("name, way", CASES)
@FUZZ
@given(data=st.data())
def test_every_invalid_command_line_ends_in_one_line_before_anything_loads(name, way, world, monkeypatch, capsys, data):
    main, barriers, args, combos = script(world, name)
    for module, function in barriers:
        monkeypatch.setattr(module, function, reached)
    monkeypatch.chdir(world / "cwd")
    before = files_under(world)
    argv = data.draw(invalid_argv(args, combos, way), label="argv")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        try:
            main(argv)
        except Reached:
            pytest.fail(f"{name}.py accepted {argv} and went on to load or run")
    out, err = capsys.readouterr()
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: "), (argv, message)     # non-zero: exit status 1
    assert "\n" not in message.strip() and not err and "Traceback" not in out, (argv, message, err)
    assert files_under(world) == before, argv


# --- Cases by hand -----------------------------------------------------------------------------------------

def refusal(main, argv, monkeypatch=None, barriers=()):
    """The one-line message main(argv) exits with (non-zero), having reached none of `barriers`."""
    for module, function in barriers:
        monkeypatch.setattr(module, function, reached)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("flags, wanted", [(["--steps", "0"], "--steps: pass a whole number >= 1, not '0'"),
                                           (["--steps", "-5"], "--steps: pass a whole number >= 1, not '-5'"),
                                           (["--target-l0", "-3"], "--target-l0: pass a number > 0, not '-3'"),
                                           (["--target-l0", "0"], "--target-l0: pass a number > 0, not '0'"),
                                           (["--batch-size", "0"], "--batch-size: pass a whole number >= 1"),
                                           (["--lr", "-1e-3"], "--lr: pass a number > 0, not '-1e-3'"),
                                           (["--d-sae", "0"], "--d-sae: pass a whole number >= 1, not '0'"),
                                           (["--d-sae", "8", "--target-l0", "16"], "--d-sae 8 is fewer latents")])
def test_train_refuses_counts_that_cannot_train(world, tmp_path, monkeypatch, flags, wanted):
    message = refusal(train.main, ["--acts", str(world / "acts"), "--out", str(tmp_path / "sae"), *flags],
                      monkeypatch, [(train, "train")])
    assert wanted in message and not (tmp_path / "sae").exists()


@pytest.mark.parametrize("tokens", ["0", "-1", "0.5"])
def test_harvest_refuses_a_token_count_below_one(world, tmp_path, monkeypatch, tokens):
    message = refusal(harvest.main, ["--out", str(tmp_path / "acts"), "--tokens", tokens], monkeypatch,
                      [(harvest, "load_model")])
    assert f"--tokens: pass a whole number >= 1, not '{tokens}'" in message and not (tmp_path / "acts").exists()


def test_harvest_refuses_a_budget_without_a_held_out_window(tmp_path, monkeypatch):
    message = refusal(harvest.main, ["--out", str(tmp_path / "acts"), "--tokens", "100"], monkeypatch,
                      [(harvest, "load_model")])
    assert "--tokens 100 holds no held-out window" in message and "at least 2540" in message


@pytest.mark.parametrize("out, wanted", [("/proc/e.onnx", "'/proc/e.onnx' cannot be written"),
                                         ("{w}/missing/e.onnx", "the folder of '{w}/missing/e.onnx' does not exist"),
                                         ("{w}/notes.txt/e.onnx", "the folder of '{w}/notes.txt/e.onnx' does not exist"),
                                         ("{w}/empty", "pass a file path, not the folder '{w}/empty'")])
def test_export_names_an_output_it_cannot_write(world, monkeypatch, out, wanted):
    message = refusal(export.main, [str(world / "sae"), "--out", out.format(w=world)], monkeypatch, [(export, "load_sae")])
    assert wanted.format(w=world) in message


def test_a_full_disk_while_writing_ends_in_one_sentence_that_names_the_file(world, tmp_path, monkeypatch):
    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(export, "atomic_write", full)
    message = refusal(export.main, [str(world / "sae"), "--out", str(tmp_path / "e.onnx")])
    assert f"writing {tmp_path / 'e.onnx'} failed (No space left on device)" in message
    monkeypatch.setattr(acts, "atomic_write", full)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: [{"name": "sae", "l0": 1.0, "firing_frequency": np.zeros(3)}])
    message = refusal(evaluate.main, [str(world / "sae"), "--acts", str(world / "acts"), "--json", str(tmp_path / "e.json")])
    assert f"writing {tmp_path / 'e.json'}" in message and "No space left on device" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, argv", [
    ("harvest", ["--out", "/proc/acts"]), ("train", ["--acts", "{w}/acts", "--out", "/proc/sae"]),
    ("evaluate", ["{w}/sae", "--acts", "{w}/acts", "--json", "/proc/e.json"]),
    ("evaluate", ["{w}/sae", "--acts", "{w}/acts", "--plot", "{w}/notes.txt/plots"]),
    ("formats", ["{w}/sae", "--out", "/sys/sae"]), ("frontier", ["--acts", "{w}/acts", "--out", "{w}/runs", "--results", "/proc/f"]),
    ("frontier", ["--acts", "{w}/acts", "--out", "/proc/runs", "--results", "{w}/results/f"]),
    ("bench", ["--json", "{w}/missing/bench.json"])])
def test_every_script_that_writes_names_an_output_it_cannot_write(world, monkeypatch, name, argv):
    main, barriers, _, _ = script(world, name)
    argv = [a.format(w=world) for a in argv]
    message = refusal(main, argv, monkeypatch, barriers)
    assert next(a for a in argv if a.startswith(("/proc", "/sys", f"{world}/missing", f"{world}/notes"))) in message


@pytest.mark.parametrize("model, npy, wanted", [
    ("missing.onnx", "x.npy", "onnx_file: pass a file that exists, not '{w}/missing.onnx'"),
    ("notes.txt", "x.npy", "{w}/notes.txt is not an ONNX model onnxruntime can load (InvalidProtobuf)"),
    ("identity.onnx", "x.npy", "{w}/identity.onnx is an ONNX model but not an SAE from export.py"),
    ("sae.onnx", "notes.txt", "{w}/notes.txt cannot be read as a .npy array"),
    ("sae.onnx", "arrays.npz", "{w}/arrays.npz cannot be read as a .npy array"),
    ("sae.onnx", "wide.npy", "expected activations of shape [rows, 6], got [4, 7]"),
    ("sae.onnx", "int.npy", "expected floating-point activations of at least one row, got 4 rows of int64"),
    ("sae.onnx", "scalar.npy", "expected activations of shape [rows, 6], got []")])
def test_infer_onnx_reports_a_wrong_model_or_input_in_one_sentence(world, model, npy, wanted):
    message = refusal(infer_onnx.main, [str(world / model), str(world / npy)])
    assert wanted.format(w=world) in message


def test_infer_onnx_without_torch_prints_one_line_and_no_traceback(world, tmp_path):
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not available in this pipeline')\n")
    env = {"PYTHONPATH": str(tmp_path / "no_torch"), "PATH": "/usr/bin:/bin"}
    for model, npy in (("notes.txt", "x.npy"), ("sae.onnx", "wide.npy"), ("missing.onnx", "x.npy")):
        run = subprocess.run([sys.executable, str(HERE / "infer_onnx.py"), str(world / model), str(world / npy)],
                             env=env, capture_output=True, text=True)
        assert run.returncode == 1 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    ok = subprocess.run([sys.executable, str(HERE / "infer_onnx.py"), str(world / "sae.onnx"), str(world / "x.npy")],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == "" and "mean L0 over 4 rows" in ok.stdout, ok.stderr


def test_nothing_is_silently_reinterpreted(world, tmp_path, monkeypatch):
    """The values that once meant "the default" or were silently bent are refused."""
    for main, argv, barriers in [
            (train.main, ["--acts", str(world / "acts"), "--out", str(tmp_path / "s"), "--d-sae", "0"], [(train, "train")]),
            (train.main, ["--acts", str(world / "acts"), "--out", str(tmp_path / "s"), "--arch", "relu", "--bandwidth", "0.1"],
             [(train, "train")]),
            (harvest.main, ["--out", str(tmp_path / "a"), "--out", ""], [(harvest, "load_model")]),
            (harvest.main, ["--out", str(tmp_path / "a"), "--dataset-column", "content"], [(harvest, "load_model")]),
            (bench.main, ["--quick", "--shapes", "576x4096", "--json", str(tmp_path / "b.json")], [(bench, "bench_train")]),
            (export.main, [str(world / "sae"), "--out", str(tmp_path / "e.onnx"), "--acts", str(world / "empty")],
             [(export, "load_sae")])]:
        refusal(main, argv, monkeypatch, barriers)
    assert list(tmp_path.iterdir()) == []
