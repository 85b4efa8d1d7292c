"""Benchmark: full-size SD 1.5 UNet (random weights, fixed seed) -> Core ML, plain path vs ours.

plain: diffusers UNet -> torch.jit.trace -> coremltools.convert(mlprogram, fp16) -> save
ours:  python_coreml_sd.convert.unet.build_mlprogram (Neural-Engine UNet sharing the diffusers tensors,
       two-step conversion with a trimmed pass pipeline) -> save

Each path runs in a fresh subprocess; wall time and peak RSS (getrusage of that child) are reported side
by side. Usage:  python scripts/bench_unet_conversion.py [--family sd1] [--latent 64] [--keep DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_diffusers_unet(family: str, seed: int):
    import torch
    from diffusers import UNet2DConditionModel
    from python_coreml_sd import registry
    torch.manual_seed(seed)
    return UNet2DConditionModel(**registry.family(family)["architecture"]["unet"]).eval().requires_grad_(False)


def bench_inputs(unet, latent: int):
    from python_coreml_sd.convert.unet import sample_inputs
    return sample_inputs(dict(unet.config), 2, latent, latent, 77)


def child_plain(args, out: Path) -> dict:
    import coremltools as ct
    import numpy as np
    import torch

    from python_coreml_sd.compression.testbed import UNetWrapper

    phases, start = {}, time.perf_counter()
    unet = build_diffusers_unet(args.family, args.seed)
    inputs = bench_inputs(unet, args.latent)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2).contiguous()
    phases["build"] = time.perf_counter() - start
    with torch.no_grad():
        traced = torch.jit.trace(UNetWrapper(unet).eval(), tuple(inputs.values()), check_trace=args.plain_check_trace)
    phases["trace"] = time.perf_counter() - start - sum(phases.values())
    mlmodel = ct.convert(traced, convert_to="mlprogram",
                         inputs=[ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.float32) for k, v in inputs.items()],
                         outputs=[ct.TensorType(name="noise_pred", dtype=np.float32)],
                         compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.macOS13,
                         skip_model_load=True)
    phases["convert"] = time.perf_counter() - start - sum(phases.values())
    mlmodel.save(str(out))
    phases["save"] = time.perf_counter() - start - sum(phases.values())
    return phases


def child_ours(args, out: Path) -> dict:
    from python_coreml_sd.convert.common import ConversionOptions
    import logging
    from python_coreml_sd import registry
    from python_coreml_sd.convert.unet import build_mlprogram, sample_inputs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("python_coreml_sd").setLevel(logging.DEBUG)  # stage-by-stage memory
    phases, start = {}, time.perf_counter()
    options = ConversionOptions(args.family, out.parent, attention_implementation=args.attention_implementation)
    config = registry.family(args.family)["architecture"]["unet"]
    inputs = sample_inputs(config, 2, args.latent, args.latent, 77)
    mlmodel, _ = build_mlprogram(lambda: build_diffusers_unet(args.family, args.seed), inputs, options)
    phases["build+trace+convert"] = time.perf_counter() - start
    mlmodel.save(str(out))
    phases["save"] = time.perf_counter() - start - sum(phases.values())
    return phases


def child_agreement(args, out: Path) -> dict:
    """PSNR of our fp16 program (MIL runtime) against the diffusers UNet in fp32, when a runtime exists."""
    try:
        from python_coreml_sd.runtime.mil import MILModel
    except ImportError as exc:
        return {"skipped": f"no MIL runtime ({exc})"}
    from python_coreml_sd.convert.unet import diffusers_reference
    from python_coreml_sd.metrics import psnr
    unet = build_diffusers_unet(args.family, args.seed)
    inputs = bench_inputs(unet, args.latent)
    reference = diffusers_reference(unet, inputs)
    del unet
    result = MILModel(str(out)).predict({k: v.numpy() for k, v in inputs.items()})
    return {"psnr_db": psnr(reference, result["noise_pred"])}


def run_child(which: str, args, workdir: Path) -> dict:
    """Run one path in a fresh interpreter; returns its phases, wall time and peak RSS (GiB)."""
    report = workdir / f"{which}.json"
    cmd = [sys.executable, __file__, "--child", which, "--workdir", str(workdir), "--family", args.family,
           "--latent", str(args.latent), "--seed", str(args.seed),
           "--attention-implementation", args.attention_implementation]
    if not args.plain_check_trace:
        cmd.append("--plain-no-check-trace")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{which} child failed (wait status {status})")
    result = json.loads(report.read_text())
    result.update(wall_s=wall, peak_rss_gib=usage.ru_maxrss / 2**20)  # ru_maxrss is KiB on Linux
    return result


def weights_gib(package: Path) -> float:
    return sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) / 2**30


def print_table(plain: dict, ours: dict, args) -> None:
    rows = [("wall time (s)", plain["wall_s"], ours["wall_s"]),
            ("peak RSS (GiB)", plain["peak_rss_gib"], ours["peak_rss_gib"]),
            ("package size (GiB)", plain["package_gib"], ours["package_gib"])]
    print(f"\nSD UNet '{args.family}', latent {args.latent}x{args.latent}, batch 2, fp16, "
          f"ours = {args.attention_implementation}; plain check_trace={args.plain_check_trace}; "
          f"{os.cpu_count()} CPU cores")
    print(f"| {'':20} | {'plain':>10} | {'ours':>10} | {'ours/plain':>10} |")
    print(f"|{'-' * 22}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for name, a, b in rows:
        print(f"| {name:20} | {a:10.2f} | {b:10.2f} | {b / a:10.2f} |")
    print("phases plain:", {k: round(v, 1) for k, v in plain["phases"].items()})
    print("phases ours: ", {k: round(v, 1) for k, v in ours["phases"].items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-implementation", default="SPLIT_EINSUM")
    parser.add_argument("--plain-no-check-trace", dest="plain_check_trace", action="store_false",
                        help="trace the plain path with check_trace=False (default: torch.jit.trace's "
                             "default, check_trace=True, as a plain conversion script does)")
    parser.add_argument("--only", choices=("plain", "ours"), help="run one path")
    parser.add_argument("--keep", type=Path, help="keep the packages in this folder")
    parser.add_argument("--child", choices=("plain", "ours", "agreement"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = args.workdir / f"{'ours' if args.child == 'agreement' else args.child}.mlpackage"
        phases = {"plain": child_plain, "ours": child_ours, "agreement": child_agreement}[args.child](args, out)
        (args.workdir / f"{args.child}.json").write_text(json.dumps({"phases": phases}))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_unet_", dir=args.keep))
    try:
        results = {}
        for which in (("plain", "ours") if not args.only else (args.only,)):
            results[which] = run_child(which, args, workdir)
            results[which]["package_gib"] = weights_gib(workdir / f"{which}.mlpackage")
            print(which, json.dumps(results[which]), flush=True)
        if len(results) == 2:
            print_table(results["plain"], results["ours"], args)
        if "ours" in results:
            print("agreement (ours fp16 vs diffusers fp32):", run_child("agreement", args, workdir)["phases"])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
