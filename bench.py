"""Benchmarks that print measured numbers (never asserted in tests).

    python bench.py onnx            # encoding throughput: onnxruntime against PyTorch eager
    python bench.py onnx --quick    # small shapes, one repeat: checks the paths run and agree

Each row times the encoder on a batch of random activations (the weights do not change the
arithmetic) at the given d_in and d_sae, on CUDA when present (and on CPU), and writes the table
to bench.json as well.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import export
from jumprelu import JumpReLUSAE


def timed(fn, repeats, sync=lambda: None):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats


def machine():
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def bench_onnx(shapes, batch, repeats):
    import onnxruntime as ort
    rows = []
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    for d_in, d_sae in shapes:
        sae = JumpReLUSAE(d_in, d_sae, threshold_init=0.05)
        x = (np.random.default_rng(0).standard_normal((batch, d_in)) / np.sqrt(d_in)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "enc.onnx"
            export.export(sae, path)
            for device in devices:
                provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]
                if provider not in ort.get_available_providers():
                    continue
                sess = ort.InferenceSession(str(path), providers=[provider])
                sae_d = sae.to(device)
                x_t = torch.from_numpy(x).to(device)
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                with torch.no_grad():
                    t_torch = timed(lambda: sae_d.encode(x_t), repeats, sync)
                    ref = sae_d.encode(x_t).cpu().numpy()
                if device == "cuda":      # keep the input on the GPU, as a pipeline would
                    binding = sess.io_binding()
                    x_ort = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
                    binding.bind_ortvalue_input("x", x_ort)
                    binding.bind_output("features", "cuda")
                    t_ort = timed(lambda: sess.run_with_iobinding(binding), repeats)
                    got = binding.copy_outputs_to_cpu()[0]
                else:
                    t_ort = timed(lambda: sess.run(None, {"x": x}), repeats)
                    got = sess.run(None, {"x": x})[0]
                agree = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
                rows.append({"device": device, "d_in": d_in, "d_sae": d_sae, "batch": batch,
                             "torch_tokens_per_s": batch / t_torch, "onnxruntime_tokens_per_s": batch / t_ort,
                             "ratio": t_torch / t_ort, "max_rel_diff": agree})
                sae = sae.cpu()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("what", choices=["onnx"])
    p.add_argument("--quick", action="store_true", help="small shapes and one repeat (CI)")
    p.add_argument("--json", default="bench.json")
    args = p.parse_args(argv)
    if args.quick:
        shapes, batch, repeats = [(64, 256)], 128, 1
    else:
        shapes, batch, repeats = [(576, 16_384), (2304, 16_384)], 4096, 3
    rows = bench_onnx(shapes, batch, repeats)
    print(f"machine: {machine()}")
    print(f"{'device':>6} {'d_in':>5} {'d_sae':>6} {'batch':>5} {'torch tok/s':>12} {'ORT tok/s':>12} {'ORT/torch':>9} {'max rel diff':>12}")
    for r in rows:
        print(f"{r['device']:>6} {r['d_in']:>5} {r['d_sae']:>6} {r['batch']:>5} {r['torch_tokens_per_s']:>12,.0f} "
              f"{r['onnxruntime_tokens_per_s']:>12,.0f} {r['ratio']:>9.2f} {r['max_rel_diff']:>12.2g}")
    Path(args.json).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "onnx": rows}, indent=1))
    print(f"wrote {args.json}")
    if any(r["max_rel_diff"] > 1e-4 for r in rows):
        raise SystemExit("error: onnxruntime and PyTorch disagree by more than 1e-4; the timings compare different work.")


if __name__ == "__main__":
    main()
