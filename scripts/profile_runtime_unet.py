#!/usr/bin/env python
"""Where a UNet step's time goes: torch.profiler kernel tables for the diffusers UNet and for our MIL
runtime on the packages bench_runtime_unet.py converts (same cache, same inputs). For finding what to
speed up, not for figures (bench_runtime_unet.py times; this one prints the top CUDA/CPU kernels).

    python scripts/profile_runtime_unet.py --device cuda --config sd15 --variants diffusers-compile \
        mil-ORIGINAL-compile mil-SPLIT_EINSUM-fused
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtime_unet as bench  # noqa: E402
from torch_baselines import compiled  # noqa: E402

VARIANTS = ("diffusers-eager", "diffusers-compile", "mil-ORIGINAL-fused", "mil-ORIGINAL-compile",
            "mil-SPLIT_EINSUM-fused", "mil-SPLIT_EINSUM-compile", "mil-SPLIT_EINSUM_V2-fused")


def diffusers_call(unet, inputs, device, compile_it):
    dtype = torch.float16 if device == "cuda" else torch.float32  # fp32: what a CPU user runs
    model = unet.to(device, dtype)
    fn = compiled(model) if compile_it else model
    x = [inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)]
    x = [t.to(device, dtype).contiguous() for t in x]
    return lambda: fn(*x, return_dict=False)[0]


def mil_call(path, inputs, device, compile_it):
    from python_coreml_sd.runtime.mil import MILModel

    model = MILModel(path, device=device, fuse=True, torch_compile=compile_it)
    stored = torch.float16 if device == "cuda" else torch.float32
    tensors = {n: v.to(device, stored) for n, v in inputs.items()}
    print(f"  {model}: op types {dict(model.op_types.most_common(12))}", flush=True)
    return lambda: model.predict_tensors(tensors)


def profile(label, call, device, rows, iters, warmup, by_shape=False):
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU]
        activities += [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []
        with torch.profiler.profile(activities=activities, record_shapes=by_shape) as prof:
            for _ in range(iters):
                call()
            if device == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n### {label} ({iters} calls)\n", flush=True)
    table = prof.key_averages(group_by_input_shape=by_shape).table(
        sort_by=key, row_limit=rows, max_name_column_width=70, max_shapes_column_width=90)
    print(table, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--config", choices=sorted(bench.CONFIGS), default="sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--target", default="macOS13")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/bench_runtime_unet"))
    p.add_argument("--rows", type=int, default=25, help="kernels listed per variant")
    p.add_argument("--iters", type=int, default=3, help="profiled calls per variant")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled calls first (compilation, lazy init)")
    p.add_argument("--by-shape", action="store_true", help="one row per kernel and input shapes")
    args = p.parse_args()
    unet = bench.build_unet(args.config)
    inputs = bench.mil_inputs(args.config, args.batch)
    variants = [v.split("-") for v in args.variants]
    for attention in sorted({v[1] for v in variants if v[0] == "mil"}):  # on the CPU, before any row moves unet
        path = bench.package_path(args, attention)
        if not path.exists():
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            bench.convert(unet, inputs, path, attention, args.target)
    for variant, (side, *rest) in zip(args.variants, variants):
        if side == "diffusers":
            call = diffusers_call(unet, inputs, args.device, rest[0] == "compile")
        else:
            call = mil_call(bench.package_path(args, rest[0]), inputs, args.device, rest[1] == "compile")
        profile(variant, call, args.device, args.rows, args.iters, args.warmup, args.by_shape)
        del call
        bench.free(args.device)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
