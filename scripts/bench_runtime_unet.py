#!/usr/bin/env python
"""Time one UNet step: the converted fp16 .mlpackage on the MIL runtime vs the same diffusers
UNet2DConditionModel in fp16, on the same device, in one run; prints a table with the ratio.

    python scripts/bench_runtime_unet.py --device cuda --config sd15
    python scripts/bench_runtime_unet.py --device cpu --config tiny

sd15 is the full-size SD 1.5 UNet architecture with random weights (seed fixed); its conversion
takes minutes (12 min on 2 CPU cores) and is cached under --cache-dir; under a per-command time
limit run it once with --convert-only, then again without.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from python_coreml_sd import registry  # noqa: E402
from python_coreml_sd.compression.testbed import UNetWrapper  # noqa: E402
from python_coreml_sd.convert.common import save  # noqa: E402
from python_coreml_sd.metrics import psnr  # noqa: E402
from python_coreml_sd.runtime.mil import MILModel  # noqa: E402

# sd15: SD 1.5's UNet from the registry; tiny: a smaller toy than the registry's `tiny`, for quick runs.
CONFIGS = {
    "sd15": registry.family("sd1")["architecture"]["unet"],
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ),
}
NAMES = ["sample", "timestep", "encoder_hidden_states"]


def build_unet(config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[config]).eval()


def sample_inputs(config, batch):
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(1)
    size = cfg["sample_size"]
    return (
        torch.randn(batch, cfg["in_channels"], size, size, generator=g),
        torch.full((batch,), 981.0),
        torch.randn(batch, 77 if config == "sd15" else 7, cfg["cross_attention_dim"], generator=g),
    )


def convert(unet, inputs, path, target):
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(UNetWrapper(unet).eval(), inputs, check_trace=False)
    model = ct.convert(
        traced, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
        inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32) for n, x in zip(NAMES, inputs)],
        minimum_deployment_target=getattr(ct.target, target),
    )
    save(model, path, overwrite=True)  # temp name, then rename: a cut-off run leaves no package behind


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    p.add_argument("--target", default="macOS13", help="coremltools minimum_deployment_target")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/bench_runtime_unet"))
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph row")
    p.add_argument("--convert-only", action="store_true",
                   help="only build the cached .mlpackage (sd15 takes minutes: run this first under a time limit)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA GPU")

    unet = build_unet(args.config)
    inputs = sample_inputs(args.config, args.batch)
    path = args.cache_dir / f"unet_{args.config}_b{args.batch}_{args.target}_fp16.mlpackage"
    if not path.exists():
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        convert(unet, inputs, path, args.target)
        print(f"converted to {path} in {time.perf_counter() - t0:.0f} s")
    if args.convert_only:
        return
    feed = {n: x.numpy() for n, x in zip(NAMES, inputs)}
    rows = bench(unet, inputs, feed, path, args)
    print_table(rows, args)


def bench(unet, inputs, feed, path, args):
    dev = args.device
    ref_unet = unet.half().to(dev)
    dev_inputs = [x.to(dev, torch.float16) for x in inputs]
    with torch.inference_mode():
        ref_out = ref_unet(*dev_inputs, return_dict=False)[0].float().cpu().numpy()
        rows = [("diffusers UNet2DConditionModel fp16", timed(lambda: ref_unet(*dev_inputs, return_dict=False), dev, args.warmup, args.iters), None)]
    del ref_unet
    variants = [("MIL runtime, per-op", dict(fuse=False)), ("MIL runtime, fused", dict(fuse=True))]
    if dev == "cuda":
        if not args.no_cuda_graph:
            variants.append(("MIL runtime, fused + CUDA graph", dict(fuse=True, cuda_graph=True)))
    for label, kw in variants:
        t0 = time.perf_counter()
        model = MILModel(path, device=dev, **kw)
        load_s = time.perf_counter() - t0
        out = list(model.predict(feed).values())[0]
        seconds = timed(lambda: model.predict(feed), dev, args.warmup, args.iters)
        rows.append((f"{label} (load {load_s:.1f} s)", seconds, psnr(ref_out, out.astype(np.float32))))
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows, args):
    base = rows[0][1]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nUNet step, config {args.config}, batch {args.batch}, fp16, {name}; median of {args.iters}")
    print(f"| {'implementation':<52} | {'ms/step':>9} | {'ratio':>6} | {'PSNR vs diffusers fp16':>22} |")
    # ratio = this row's time / diffusers' time; the MIL rows include numpy <-> device copies
    print(f"|{'-' * 54}|{'-' * 10}:|{'-' * 7}:|{'-' * 23}:|")
    for label, seconds, value in rows:
        shown = "" if value is None else f"{value:.1f} dB"
        print(f"| {label:<52} | {seconds * 1e3:9.2f} | {seconds / base:6.2f} | {shown:>22} |")


if __name__ == "__main__":
    main()
