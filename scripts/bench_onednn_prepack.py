#!/usr/bin/env python
"""The evidence for the MIL runtime's CPU prepacking rule (python_coreml_sd/runtime/mil/ops/onednn.py):
each 3x3 convolution and GEMM shape of an SD 1.5 UNet step (batch 2, 64x64 latents), timed as PyTorch's
eager F.conv2d / F.linear run it and on weights laid out for oneDNN once (the runtime's kernels), with
the count of each shape in one step, so the totals say what a step gains. Random fp32 data; the packed
results are checked against the eager ones. Kernel timing, not figures of a whole step
(bench_runtime_unet.py times those).

    taskset -c 0,1 python scripts/bench_onednn_prepack.py --iters 7
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from python_coreml_sd.runtime.mil.ops import onednn

# (input channels, latent side, output channels, calls per step): every 3x3 convolution of the step.
CONVS = [(1280, 16, 1280, 8), (320, 64, 320, 8), (640, 32, 640, 7), (1280, 8, 1280, 11), (2560, 16, 1280, 2),
         (640, 64, 640, 1), (1280, 32, 1280, 1), (640, 64, 320, 2), (960, 64, 320, 1), (1920, 16, 1280, 1),
         (1920, 32, 640, 1), (2560, 8, 1280, 3), (1280, 32, 640, 1), (960, 32, 640, 1), (640, 16, 1280, 1),
         (320, 32, 640, 1)]
# (rows, in, out, calls per step): the step's largest GEMMs (linears and 1x1 convolutions, merged q/k/v).
GEMMS = [(512, 1280, 10240, 5), (8192, 320, 2560, 5), (2048, 640, 5120, 5), (8192, 1280, 320, 5),
         (8192, 320, 320, 19), (512, 1280, 1280, 20), (512, 5120, 1280, 5), (2048, 2560, 640, 5),
         (2048, 640, 640, 20), (8192, 320, 960, 5), (512, 1280, 3840, 5), (2048, 640, 1920, 5)]


def median_ms(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def conv_rows(iters):
    for cin, side, cout, calls in CONVS:
        x, w, b = torch.randn(2, cin, side, side), torch.randn(cout, cin, 3, 3) * 0.01, torch.randn(cout)
        packed = onednn.pack_conv(w, (1, 1), (1, 1), (1, 1), 1, x.shape)
        eager = lambda: F.conv2d(x, w, b, padding=1)  # noqa: E731
        fast = lambda: onednn.conv(x, packed, b, (1, 1), (1, 1), (1, 1), 1)  # noqa: E731
        torch.testing.assert_close(fast(), eager(), rtol=1e-4, atol=1e-4)
        rule = "packed" if onednn.conv_worth_packing(w.shape, x.shape) else "eager"
        yield f"conv {cin}->{cout} @ {side}x{side}", calls, median_ms(eager, iters), median_ms(fast, iters), rule


def gemm_rows(iters):
    for rows, cin, cout, calls in GEMMS:
        x, w, b = torch.randn(rows, cin), torch.randn(cout, cin) * 0.01, torch.randn(cout)
        packed = onednn.pack_linear(w, rows)
        eager = lambda: F.linear(x, w, b)  # noqa: E731
        fast = lambda: onednn.linear(x, packed, b)  # noqa: E731
        torch.testing.assert_close(fast(), eager(), rtol=1e-4, atol=1e-4)
        yield f"GEMM {rows}x{cin} -> {cout}", calls, median_ms(eager, iters), median_ms(fast, iters), "packed"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=7, help="timed calls per kernel (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    args = parser.parse_args()
    if not onednn.AVAILABLE:
        raise SystemExit("this PyTorch build has no oneDNN (mkldnn) CPU kernels")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.iters}")
    print("| shape | calls / step | eager ms | packed ms | packed / eager | runtime uses |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    totals = {"eager": 0.0, "packed": 0.0, "rule": 0.0}
    with torch.no_grad():
        for name, calls, eager, fast, rule in [*conv_rows(args.iters), *gemm_rows(args.iters)]:
            print(f"| {name} | {calls} | {eager:.1f} | {fast:.1f} | {fast / eager:.2f} | {rule} |")
            totals["eager"] += calls * eager
            totals["packed"] += calls * fast
            totals["rule"] += calls * (fast if rule == "packed" else eager)
    print(f"per step: eager {totals['eager']:.0f} ms, all packed {totals['packed']:.0f} ms, "
          f"the runtime's rule {totals['rule']:.0f} ms")


if __name__ == "__main__":
    main()
