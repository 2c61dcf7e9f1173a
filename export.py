"""Export an SAE folder to ONNX, and check the export against PyTorch in onnxruntime.

    python export.py runs/sae --out runs/sae.onnx                   # encoder: x -> features
    python export.py runs/sae --out runs/sae_full.onnx --what sae   # x -> features, x_hat
    python export.py runs/sae --out runs/sae_top.onnx --topk 64     # x -> top-64 indices, values
    python export.py runs/sae --out runs/sae16.onnx --fp16          # float16 weights and matmuls

Input `x` is float32 [batch, d_in] in raw activation space (the input scale is already folded
into the weights); the batch axis is dynamic. A JumpReLU latent is active when its pre-activation
is strictly greater than its threshold (ONNX Greater), as in PyTorch. Every architecture of
baselines.py exports: ReLU, Gated (its gate and magnitude paths share one MatMul), TopK (ONNX TopK)
and BatchTopK (with its global inference threshold). With --fp16 the weights and matrix products
are float16 and the comparisons stay float32. The SAE's config
(d_in, d_sae, model, layer, site, input scale...) is in the model's metadata.

Every export is checked before it is reported: onnx.checker, then onnxruntime (CUDA when
present, else CPU) against PyTorch on random inputs and, when the SAE's activation folder is
found, on real held-out activations; the largest absolute and relative errors are printed and
the script exits non-zero over tolerance. infer_onnx.py runs the result with numpy alone.
We use PyTorch's TorchScript-based exporter (dynamo=False): the graph is a handful of operators,
and it needs no extra package.
"""

import copy
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import acts
import cli
from evaluate import check_pairing
from formats import load_sae, sae_path
from jumprelu import jumprelu
from sae_folder import atomic_write, config_of

OPSET = 17
# When a latent is active, per architecture (the "active" entry of the ONNX metadata).
ACTIVE = {"jumprelu": "pre-activation > threshold (strictly)", "relu": "pre-activation > 0",
          "gated": "gate pre-activation > 0 and magnitude > 0",
          "topk": "among the row's k largest pre-activations, and > 0",
          "batchtopk": "pre-activation > max(threshold, 0) (the global inference threshold)"}


def pre_encoder_bias(sae):
    """Whether the encoder sees x - b_dec (always for Gated, TopK and BatchTopK; optional for JumpReLU)."""
    return getattr(sae, "pre_encoder_bias", sae.architecture in ("gated", "topk", "batchtopk"))


class Graph(nn.Module):
    """What is exported: the SAE's own `encode` (and `decode` for --what sae), top-k on request,
    float32 in and out. With fp16 the weights and matrix products are float16 and the thresholds
    stay float32, as in a float16 SAE. JumpReLU's thresholds are a constant, theta as the folder
    holds it: traced, `encode` computes exp(log_threshold) in the runtime, and onnxruntime's Exp
    differs from PyTorch's in the last bit for about 7% of float32 inputs."""

    def __init__(self, sae, what="encoder", fp16=False, topk=None):
        super().__init__()
        self.what, self.topk, self.fp16 = what, topk, fp16
        self.dtype = torch.float16 if fp16 else torch.float32
        self.sae = copy.deepcopy(sae).cpu().eval()
        keep = {"log_threshold", "threshold"}                        # float32 whatever the weights' dtype
        for name, t in (*self.sae.named_parameters(), *self.sae.named_buffers()):
            if name not in keep:
                t.data = t.data.to(self.dtype)
        if sae.architecture == "jumprelu":
            self.register_buffer("threshold", sae.threshold.detach().float().cpu().clone())

    def features(self, x):
        h = x.to(self.dtype)
        if self.sae.architecture == "jumprelu":                      # encode, with theta a constant
            return jumprelu(self.sae.pre_acts(h), self.threshold, self.sae.bandwidth).float()
        return self.sae.encode(h).float()

    def forward(self, x):
        features = self.features(x)
        outputs = list(features.topk(self.topk, dim=-1))[::-1] if self.topk else [features]   # indices, values
        if self.what == "sae":
            outputs.append(self.sae.decode(features.to(self.dtype)).float())
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    def output_names(self):
        return (["indices", "values"] if self.topk else ["features"]) + (["x_hat"] if self.what == "sae" else [])


def export(sae, path, what="encoder", fp16=False, topk=None):
    """Write the ONNX file (through a temporary name) with the SAE's config in its metadata."""
    import onnx
    if what not in ("encoder", "sae"):
        raise ValueError(f"--what must be encoder or sae, not {what!r}.")
    if topk is not None and not 1 <= topk <= sae.d_sae:
        raise ValueError(f"--topk must be between 1 and d_sae={sae.d_sae}, not {topk}.")
    module = Graph(sae, what, fp16, topk).eval()
    names = module.output_names()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # the TorchScript exporter, chosen on purpose
        torch.onnx.export(module, (torch.zeros(2, sae.d_in),), buffer, input_names=["x"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["x"] + names}, opset_version=OPSET,
                          dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    meta = {**config_of(sae), "what": what, "fp16": fp16, "topk": topk,
            "active": ACTIVE[sae.architecture], "input": "raw activations, float32 [batch, d_in]"}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(model)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))
    return module


def session(path):
    """An onnxruntime session on CUDA when it is available, else on CPU."""
    import onnxruntime as ort
    providers = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        # use_tf32 0: the CUDA provider's default TF32 matmuls round the inputs to 10 mantissa bits,
        # which moves pre-activations across thresholds; the graph promises float32.
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    return ort.InferenceSession(str(path), providers=providers)


def compare(sess, module, sae, x, tie_tol):
    """Largest absolute and relative errors of onnxruntime against the float32 PyTorch SAE on x.

    A latent whose pre-activation lies within rounding of its threshold (or, with --topk, of the
    row's k-th largest value) may be active in one runtime and not the other. Rows whose active
    sets differ only at such latents are counted as ties and left out; a row that differs anywhere
    else makes the error infinite.
    """
    x_t = torch.from_numpy(x)
    with torch.no_grad():
        reference = Graph(sae, module.what, fp16=False, topk=module.topk)
        want = reference(x_t)
        features = reference.features(x_t).numpy()
    want = [w.numpy() for w in ([want] if isinstance(want, torch.Tensor) else want)]
    got = dict(zip(module.output_names(), sess.run(None, {"x": x})))
    want = dict(zip(module.output_names(), want))
    at_threshold, bound = near_boundary(sae, x, tie_tol)
    if module.topk:      # active sets from the (index, value > 0) pairs
        active = {}
        for name, out in (("want", want), ("got", got)):
            a = np.zeros(features.shape, bool)
            np.put_along_axis(a, out["indices"], out["values"] > 0, axis=1)
            active[name] = a
    else:
        active = {"want": want["features"] != 0, "got": got["features"] != 0}
    differ = active["want"] != active["got"]
    near = at_threshold.copy()
    if module.topk:      # and a latent level with the k-th largest value of its row
        near |= np.abs(features - want["values"][:, -1:]) <= 2 * bound
    if (differ & ~near).any():
        return {"rows": len(x), "ties": int(differ.any(1).sum()), "max_abs": float("inf"), "max_rel": float("inf")}
    rows = ~differ.any(1)
    # x_hat depends on every active latent; with --topk the outputs show only k of them, so a row
    # with any latent at its threshold may differ unseen: leave such rows out of x_hat.
    rows_x_hat = rows & ~at_threshold.any(1) if module.topk else rows
    report = {"rows": len(x), "ties": int((~rows_x_hat if "x_hat" in want else ~rows).sum()), "max_abs": 0.0, "max_rel": 0.0}
    for name in want:
        if name == "indices":      # equal active sets; the order of equal values may differ
            continue
        keep = rows_x_hat if name == "x_hat" else rows
        if not keep.any():         # nothing could be compared: not verified
            report.update(max_abs=float("inf"), max_rel=float("inf"), unverified=name)
            return report
        err = np.abs(want[name][keep] - got[name][keep])
        scale = np.abs(want[name][keep]).max() if err.size else 0.0
        if err.size:
            report["max_abs"] = max(report["max_abs"], float(err.max()))
            report["max_rel"] = max(report["max_rel"], float(err.max() / scale) if scale else float(err.max()))
    return report


def near_boundary(sae, x, tie_tol):
    """Where a latent's activity could flip under rounding: its decision quantity (pre - theta, the
    gate, the magnitude, the distance to the row's k-th largest) within the rounding bound of its
    dot product, c * u * (|h| @ |W_enc| + |bias|). Returns that [B, F] mask and the bound."""
    W = np.abs(sae.W_enc.detach().numpy())
    h = x - sae.b_dec.detach().numpy() if pre_encoder_bias(sae) else x
    hW = h @ sae.W_enc.detach().numpy()
    dot_bound = tie_tol * (np.abs(h) @ W)
    if sae.architecture == "gated":
        scale = sae.r_mag.detach().exp().numpy()
        gate, b_gate = hW + sae.b_gate.detach().numpy(), np.abs(sae.b_gate.detach().numpy())
        mag, b_mag = hW * scale + sae.b_mag.detach().numpy(), np.abs(sae.b_mag.detach().numpy())
        bound = dot_bound * np.maximum(scale, 1) + tie_tol * np.maximum(b_gate, b_mag)
        return (np.abs(gate) <= bound) | (np.abs(mag) <= bound), bound
    pre = hW + sae.b_enc.detach().numpy()
    bound = dot_bound + tie_tol * np.abs(sae.b_enc.detach().numpy())
    if sae.architecture == "topk":
        kth = -np.partition(-pre, sae.k - 1, axis=1)[:, sae.k - 1:sae.k]
        return (np.abs(pre) <= bound) | (np.abs(pre - kth) <= 2 * bound), bound
    theta = {"jumprelu": lambda: sae.threshold.detach().numpy(),
             "batchtopk": lambda: max(float(sae.threshold), 0.0)}.get(sae.architecture, lambda: 0.0)()
    return np.abs(pre - theta) <= bound, bound


def tolerances(fp16):
    """(relative tolerance of a check against float32 PyTorch, tie zone: 8 unit roundoffs of the dtype)."""
    return (2e-2, 8 * 2.0**-11) if fp16 else (1e-5, 8 * 2.0**-24)


def verify(path, module, sae, acts_dir=None, tol=None, rows=512, seed=0):
    """Parity of the ONNX file with PyTorch on random and (if available) real activations."""
    default_tol, tie_tol = tolerances(module.fp16)
    tol = tol or default_tol
    sess = session(path)
    rng = np.random.default_rng(seed)
    scale = 1.0 / sae.metadata.get("input_scale", 1.0) / np.sqrt(sae.d_in)   # raw-space magnitude
    inputs = {"random": (rng.standard_normal((rows, sae.d_in)) * scale).astype(np.float32)}
    if acts_dir is not None:
        _, shards = acts.open_split(acts_dir, "heldout")
        inputs["real"] = np.array(shards[0][0][:rows], dtype=np.float32)      # a copy: the shard is read-only
    reports = {name: compare(sess, module, sae, x, tie_tol) for name, x in inputs.items()}
    ok = all(r["max_rel"] <= tol for r in reports.values())
    return ok, reports, sess.get_providers()[0], tol


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("sae_dir", type=sae_path, help="SAE folder (ours or SAELens's) or a Gemma Scope params.npz")
    p.add_argument("--out", required=True, type=cli.out_file, help="ONNX file to write (its folder must exist)")
    p.add_argument("--what", choices=("encoder", "sae"), default="encoder", help="encoder only, or the whole SAE (adds x_hat)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and matrix products")
    p.add_argument("--topk", type=cli.positive_int, default=None, help="output only the top-k latents per row (indices, values)")
    p.add_argument("--acts", type=acts.folder, default=None,
                   help="harvested folder for the real-activation check (default: the SAE's own, if it is there)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="check on --acts of another model, layer or site than the SAE's own, on purpose")
    p.add_argument("--tol", type=cli.positive, default=None, help="relative tolerance (default 1e-5, 2e-2 with --fp16)")
    args = p.parse_args(argv)
    try:
        sae = load_sae(args.sae_dir)
        acts_dir = args.acts or sae.metadata.get("acts")
        if acts_dir and not (Path(acts_dir) / acts.MANIFEST).is_file():
            print(f"note: {acts_dir} is not here; checking on random inputs only.")
            acts_dir = None
        if acts_dir:
            check_pairing(sae, acts.read_manifest(acts_dir), args.sae_dir, acts_dir, args.allow_mismatch)
        module = export(sae, args.out, args.what, args.fp16, args.topk)
        ok, reports, provider, tol = verify(args.out, module, sae, acts_dir, args.tol)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:     # a full disk: atomic_write left no part of the file
        sys.exit(f"error: writing {args.out} failed ({e.strerror or e}); free space or pass another --out.")
    for name, r in reports.items():
        print(f"{name:>6} activations ({r['rows']} rows, {provider}): max abs error {r['max_abs']:.3g}, "
              f"max rel error {r['max_rel']:.3g}" + (f" ({r['ties']} rows with an at-threshold tie left out)" if r["ties"] else ""))
    size = Path(args.out).stat().st_size / 2**20
    unverified = {r["unverified"] for r in reports.values() if "unverified" in r}
    if unverified:
        sys.exit(f"error: every row has a latent within rounding of its threshold, so {', '.join(unverified)} could not be "
                 f"checked; export without --topk (or without --fp16) to verify it.")
    if not ok:
        sys.exit(f"error: the ONNX output differs from PyTorch by more than {tol:g} (relative); {args.out} is not trustworthy.")
    print(f"wrote {args.out} ({size:.1f} MiB, {args.what}{', fp16' if args.fp16 else ''}"
          f"{f', top-{args.topk}' if args.topk else ''}): matches PyTorch within {tol:g}")


if __name__ == "__main__":
    main()
