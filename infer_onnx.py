"""Run an exported SAE encoder with numpy and onnxruntime only: no PyTorch needed.

    python infer_onnx.py runs/sae.onnx activations.npy        # a [rows, d_in] float array
    python infer_onnx.py runs/sae.onnx activations.npy --top 5

Prints, for the first rows, the most active latents and their values, and the mean L0. This is
the code a production pipeline copies: read the SAE's config from the ONNX metadata, check the
input's width and dtype, run the session.
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort


def load(path):
    """An onnxruntime session (CUDA if available, else CPU) and the SAE config from its metadata."""
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))   # float32 as exported, not TF32
    sess = ort.InferenceSession(path, providers=providers)
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    return sess, meta


def encode(sess, meta, x):
    """Feature activations for x [rows, d_in] (raw activations); returns a dict of named outputs."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != meta["d_in"]:
        raise ValueError(f"expected activations of shape [rows, {meta['d_in']}], got {list(x.shape)}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected floating-point activations, got {x.dtype}.")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"x": x.astype(np.float32)})))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_file")
    p.add_argument("activations", help=".npy file of raw activations [rows, d_in]")
    p.add_argument("--rows", type=int, default=3, help="rows to print")
    p.add_argument("--top", type=int, default=5, help="latents to print per row")
    args = p.parse_args(argv)
    try:
        sess, meta = load(args.onnx_file)
        x = np.load(args.activations, mmap_mode="r", allow_pickle=False)
        out = encode(sess, meta, x[:4096])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if "features" in out:
        f = out["features"]
        l0 = (f != 0).sum(1)
        top = np.argsort(-f, axis=1)[:, :args.top]
        pairs = lambda r: [(int(i), float(f[r, i])) for i in top[r] if f[r, i] > 0]
    else:
        l0 = (out["values"] > 0).sum(1)
        pairs = lambda r: [(int(i), float(v)) for i, v in zip(out["indices"][r, :args.top], out["values"][r, :args.top]) if v > 0]
    print(f"{meta.get('architecture')} SAE, d_in {meta['d_in']}, d_sae {meta['d_sae']}, "
          f"{meta.get('model')} layer {meta.get('layer')} {meta.get('site')}; providers {sess.get_providers()}")
    for r in range(min(args.rows, len(l0))):
        print(f"row {r}: L0 {int(l0[r])}, top latents " + ", ".join(f"{i}:{v:.3f}" for i, v in pairs(r)))
    print(f"mean L0 over {len(l0)} rows: {l0.mean():.1f}")


if __name__ == "__main__":
    main()
