"""Run an exported SAE encoder with numpy and onnxruntime only: no PyTorch needed.

    python infer_onnx.py runs/sae.onnx activations.npy        # a [rows, d_in] float array
    python infer_onnx.py runs/sae.onnx activations.npy --top 5

Prints, for the first rows, the most active latents and their values, and the mean L0. A --topk K
export gives each row's K largest features only: a row with fewer than K of them active shows its
L0, one with all K active an L0 of K or more. This is the code a production pipeline copies: read
the SAE's config from the ONNX metadata, check the input's width and dtype, run the session.
"""

import json
import sys

import numpy as np
import onnxruntime as ort

import cli


def load(path):
    """An onnxruntime session (CUDA if available, else CPU) and the SAE config from its metadata;
    one-sentence ValueError for a file that is not an SAE exported by export.py."""
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))   # float32 as exported, not TF32
    ort.set_default_logger_severity(4)   # the GPU build on a machine without CUDA logs two screens, then runs on CPU
    try:
        sess = ort.InferenceSession(path, providers=providers)
    except Exception as e:          # onnxruntime's exceptions (InvalidProtobuf, NoSuchFile...) derive from Exception alone
        raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({type(e).__name__}); pass a file written "
                         "by export.py.") from None
    finally:
        ort.set_default_logger_severity(2)                    # onnxruntime's default: warnings
    try:
        meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    except ValueError:
        meta = {}
    inputs, outputs = [(i.name, i.type) for i in sess.get_inputs()], {o.name for o in sess.get_outputs()}
    if inputs != [("x", "tensor(float)")] or not {"features", "values"} & outputs or not all(
            isinstance(meta.get(k), int) for k in ("d_in", "d_sae")):
        raise ValueError(f"{path} is an ONNX model but not an SAE from export.py (no float input x, features output or "
                         "d_in in its metadata); pass a file export.py wrote.")
    return sess, meta


def read_activations(path):
    """A .npy array, memory-mapped; one-sentence ValueError for any other file."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
        assert isinstance(x, np.ndarray)
    except (ValueError, OSError, EOFError, AssertionError):
        raise ValueError(f"{path} cannot be read as a .npy array; pass [rows, d_in] activations saved with numpy.save.") from None
    return x


def encode(sess, meta, x):
    """Feature activations for x [rows, d_in] (raw activations); returns a dict of named outputs."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != meta["d_in"]:
        raise ValueError(f"expected activations of shape [rows, {meta['d_in']}], got {list(x.shape)}; pass the "
                         "activations of the site the SAE was trained on.")
    if not np.issubdtype(x.dtype, np.floating) or not len(x):
        raise ValueError(f"expected floating-point activations of at least one row, got {len(x)} rows of {x.dtype}.")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"x": x.astype(np.float32)})))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("onnx_file", type=cli.existing_file, help="an SAE exported by export.py")
    p.add_argument("activations", type=cli.existing_file, help=".npy file of raw activations [rows, d_in]")
    p.add_argument("--rows", type=cli.count, default=3, help="rows to print (default 3)")
    p.add_argument("--top", type=cli.positive_int, default=5, help="latents to print per row (default 5)")
    args = p.parse_args(argv)
    try:
        sess, meta = load(args.onnx_file)
        x = read_activations(args.activations)
        out = encode(sess, meta, x[:4096] if x.ndim == 2 else x)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if "features" in out:
        f = out["features"]
        l0, k = (f != 0).sum(1), None
        top = np.argsort(-f, axis=1)[:, :args.top]
        pairs = lambda r: [(int(i), float(f[r, i])) for i in top[r] if f[r, i] > 0]
    else:                        # --topk K: the K largest; a row with all K active has an L0 of K or more
        l0, k = (out["values"] > 0).sum(1), out["values"].shape[1]
        pairs = lambda r: [(int(i), float(v)) for i, v in zip(out["indices"][r, :args.top], out["values"][r, :args.top]) if v > 0]
    print(f"{meta.get('architecture')} SAE, d_in {meta['d_in']}, d_sae {meta['d_sae']}, "
          f"{meta.get('model')} layer {meta.get('layer')} {meta.get('site')}; providers {sess.get_providers()}")
    shown = lambda n: f"{n}" if n != k else f">= {k} (all of the top {k} active)"
    for r in range(min(args.rows, len(l0))):
        print(f"row {r}: L0 {shown(int(l0[r]))}, top latents " + ", ".join(f"{i}:{v:.3f}" for i, v in pairs(r)))
    full = int((l0 == k).sum()) if k else 0
    if full:
        print(f"mean L0 over {len(l0)} rows: at least {l0.mean():.1f}, since {full} rows have all of the top {k} active; "
              "export without --topk for the exact L0.")
    else:
        print(f"mean L0 over {len(l0)} rows: {l0.mean():.1f}")


if __name__ == "__main__":
    main()
