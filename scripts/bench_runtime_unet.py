#!/usr/bin/env python
"""Time one UNet step: the fp16 .mlpackage that our converter makes, run by our MIL runtime, against the
same diffusers UNet2DConditionModel run the ways a PyTorch user would run it, same device, one run.

    python scripts/bench_runtime_unet.py --device cuda --config sd15     # one command, conversion included
    python scripts/bench_runtime_unet.py --device cpu --config tiny

Packages: python_coreml_sd.convert.unet.build_mlprogram, one per --attention (default ORIGINAL and
SPLIT_EINSUM), fp16, cached under --cache-dir. Rows (CUDA-graph rows on CUDA only):

  diffusers eager <dtype>                          the module called directly (SDPA attention)
  diffusers eager <dtype> + CUDA graph             that call captured once, replayed
  diffusers torch.compile <dtype>                  torch.compile(unet), default mode
  diffusers torch.compile <dtype> + CUDA graph     the compiled call captured once, replayed
  MIL runtime <attention>, per-op | fused | fused + CUDA graph | fused + torch.compile [+ CUDA graph]
                                                   (--device-tensors: CUDA-graph rows also on device tensors)

<dtype> is float16, plus float32 on the CPU (where fp16 is rarely a user's choice). Times are the
median of --iters calls after --warmup calls (CUDA events on a GPU), timed in interleaved rounds (every
row once per round; --sequential: one row after another, one model in memory at a time). The diffusers
rows keep inputs and output on the device; the MIL rows go through MILModel.predict, numpy in and out, so
they also pay the host <-> device copies (the "device tensors" rows call predict_tensors instead). PSNR is against the diffusers eager float16 output of the same
run. "setup" is what a row pays once, up to the end of its first call: compilation, graph capture, or
MILModel loading, plus that call; the torch.compile + CUDA graph row reuses the compiled module of the
row before it.

sd15 is the full-size SD 1.5 UNet architecture (registry family sd1) with random weights (seed 0);
tiny is a small toy for quick runs.
"""
import argparse
import copy
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from python_coreml_sd import __version__, registry  # noqa: E402
from python_coreml_sd.metrics import psnr  # noqa: E402
from torch_baselines import compiled, cuda_graphed, interleaved_median_ms, median_ms, to_numpy  # noqa: E402

# sd15: SD 1.5's UNet from the registry; tiny: a smaller toy than the registry's `tiny`, for quick runs.
CONFIGS = {
    "sd15": dict(registry.family("sd1")["architecture"]["unet"], text_len=77),
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, text_len=8,
    ),
}
ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")


def unet_config(config):
    return {k: v for k, v in CONFIGS[config].items() if k != "text_len"}


def build_unet(config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config(config)).eval().requires_grad_(False)


def mil_inputs(config, batch):
    """Our converter's inputs (encoder_hidden_states as (B, C, 1, S)); the diffusers rows get the same
    values as (B, S, C)."""
    from python_coreml_sd.convert.unet import sample_inputs

    cfg = CONFIGS[config]
    return sample_inputs(cfg, batch, cfg["sample_size"], cfg["sample_size"], cfg["text_len"])


def package_path(args, attention) -> Path:
    return args.cache_dir / (f"unet_{args.config}_b{args.batch}_{attention}_{args.target}_fp16"
                             f"_v{__version__}.mlpackage")


def convert(unet, inputs, path, attention, target):
    """Through our converter, as `torch2coreml --convert-unet` does (without the correctness check)."""
    from python_coreml_sd.convert import ConversionOptions
    from python_coreml_sd.package_io import save_mlmodel
    from python_coreml_sd.convert.unet import build_mlprogram

    options = ConversionOptions(f"bench_runtime_unet_{path.stem}", path.parent, attention_implementation=attention,
                                min_deployment_target=target)
    mlmodel, _ = build_mlprogram(lambda convert: copy.deepcopy(unet), inputs, options, dict(unet.config))
    save_mlmodel(mlmodel, path, overwrite=True)  # temp name, then rename: a cut-off run leaves no package behind


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class Row:
    """One implementation: `run` times one step; `out` is its output (numpy), or `error` why it has none."""

    def __init__(self, label, setup_s=None, run=None, out=None, error=None):
        self.label, self.setup_s, self.run, self.out, self.error = label, setup_s, run, out, error
        self.ms = None


def failed(label, exc) -> Row:
    return Row(label, error=" ".join(f"{type(exc).__name__}: {exc}".split())[:200])


def torch_rows(unet, inputs, args, dtype):
    """Yields the diffusers rows of one dtype, each ready to time (its first call already made)."""
    dev, name = args.device, str(dtype).replace("torch.", "")
    model = copy.deepcopy(unet).to(dev, dtype)
    x = [inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)]
    x = [t.to(dev, dtype).contiguous() for t in x]

    def call(fn):
        return lambda *a: fn(*a, return_dict=False)[0]

    variants = [(f"diffusers eager {name}", lambda: call(model), False)]
    if dev == "cuda" and not args.no_cuda_graph:
        variants.append((f"diffusers eager {name} + CUDA graph", lambda: call(model), True))
    if not args.no_compile:
        compiled_model = {}

        def get_compiled():
            if "fn" not in compiled_model:
                compiled_model["fn"] = call(compiled(model))
            return compiled_model["fn"]

        variants.append((f"diffusers torch.compile {name}", get_compiled, False))
        if dev == "cuda" and not args.no_cuda_graph:
            variants.append((f"diffusers torch.compile {name} + CUDA graph", get_compiled, True))
    for label, make, graphed in variants:
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                fn = make()
                if graphed:
                    run, _ = cuda_graphed(fn, [t.clone() for t in x])
                else:
                    fn(*x)  # first call: compilation for torch.compile, lazy init for eager
                    run = lambda fn=fn: fn(*x)  # noqa: E731
                if dev == "cuda":
                    torch.cuda.synchronize()
                setup = time.perf_counter() - t0
                out = to_numpy(run())
            yield Row(label, setup, lambda run=run: _inference(run), out)
        except Exception as exc:  # a baseline that does not run is reported, not hidden
            yield failed(label, exc)


def _inference(run):
    with torch.inference_mode():
        return run()


def mil_rows(path, feed, args, attention):
    """Yields the MIL runtime rows of one package, each ready to time (its first call already made)."""
    graphs = args.device == "cuda" and not args.no_cuda_graph
    variants = [("per-op", dict(fuse=False)), ("fused", dict(fuse=True))]
    variants += [("fused + CUDA graph", dict(fuse=True, cuda_graph=True))] if graphs else []
    if not args.no_compile:
        variants.append(("fused + torch.compile", dict(fuse=True, torch_compile=True)))
        variants += [("fused + torch.compile + CUDA graph", dict(fuse=True, torch_compile=True, cuda_graph=True))] \
            if graphs else []
    for name, kw in variants:
        for on_device in (False, True) if args.device_tensors and kw.get("cuda_graph") else (False,):
            yield mil_row(f"MIL runtime {attention}, {name}" + (", device tensors" if on_device else ""),
                          path, feed, args, kw, on_device)


def mil_row(label, path, feed, args, kw, on_device):
    """One MIL row; on_device: inputs placed on the device once and predict_tensors called (what a loop of
    UNet steps that keeps its latents on the GPU pays), else predict with numpy in and out."""
    from python_coreml_sd.runtime.mil import MILModel

    try:
        t0 = time.perf_counter()
        model = MILModel(path, device=args.device, **kw)
        if on_device:
            stored = torch.float16 if args.device == "cuda" else torch.float32  # storage_dtype of fp16 inputs
            tensors = {n: torch.from_numpy(v).to(args.device, stored) for n, v in feed.items()}
            call = lambda: model.predict_tensors(tensors)  # noqa: E731
        else:
            call = lambda: model.predict(feed)  # noqa: E731
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = call()["noise_pred"]  # compiles and captures the graph, if any
        fell_back = [w for w in caught if "failed" in str(w.message)]
        if fell_back:
            raise RuntimeError(str(fell_back[0].message))
        out = to_numpy(out) if on_device else out.astype(np.float32)
        return Row(label, time.perf_counter() - t0, call, out)
    except Exception as exc:
        return failed(label, exc)


def time_rows(row_sources, args):
    """Time every row. Interleaved (default): build all rows, then time them in rounds (every row once
    per round), so load or clock changes during the run touch all rows alike. --sequential: time each
    row as soon as it is built and drop it (one model in memory at a time)."""
    rows, pending = [], []
    for source in row_sources:
        for row in source():
            print(f"  {row.label}: {'ready' if row.error is None else 'failed: ' + row.error}", flush=True)
            rows.append(row)
            if row.error is not None:
                continue
            if args.sequential:
                row.ms = median_ms(row.run, args.device, args.warmup, args.iters)
                row.run = None
                free(args.device)
            else:
                pending.append(row)
    if pending:
        for row, ms in zip(pending, interleaved_median_ms([r.run for r in pending], args.device,
                                                          args.warmup, args.iters)):
            row.ms = ms
            row.run = None
    return rows


def print_table(rows, args, reference_label):
    name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads on {len(os.sched_getaffinity(0))} usable cores"
    ref_row = next(r for r in rows if r.label == reference_label)
    if ref_row.ms is None:
        raise SystemExit(f"{reference_label} failed: {ref_row.error}")
    best = min((r for r in rows if r.ms is not None and r.label.startswith("diffusers")), key=lambda r: r.ms)
    cfg = CONFIGS[args.config]
    how = "one row after another" if args.sequential else "interleaved rounds"
    print(f"\nUNet step, config {args.config}, batch {args.batch}, latent {cfg['sample_size']}x{cfg['sample_size']}, "
          f"text {cfg['text_len']} tokens, {name}; torch {torch.__version__}; median of {args.iters} "
          f"({how}) after {args.warmup} warm-up calls")
    print(f"| implementation | setup (s) | ms / step | vs {reference_label} | vs best diffusers | "
          f"PSNR vs {reference_label} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r.ms is None:
            print(f"| {r.label} | failed: {r.error} | | | | |")
            continue
        agreement = "" if r is ref_row else f"{psnr(ref_row.out, r.out):.1f} dB"
        print(f"| {r.label} | {r.setup_s:.1f} | {r.ms:.2f} | {r.ms / ref_row.ms:.2f} | {r.ms / best.ms:.2f} | "
              f"{agreement} |")
    print(f"best diffusers row: {best.label}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=["ORIGINAL", "SPLIT_EINSUM"],
                   help="attention implementations to convert and run")
    p.add_argument("--target", default="macOS13", help="minimum deployment target of the packages")
    p.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default: 20 on CUDA, 10 on CPU")
    p.add_argument("--torch-dtypes", nargs="+", choices=["float16", "float32"], default=None,
                   help="dtypes of the diffusers rows (default: float16 on CUDA, float16 and float32 on CPU)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/bench_runtime_unet"))
    p.add_argument("--reconvert", action="store_true", help="convert even if a cached package exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every row (default: PyTorch's choice, one per usable core)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (diffusers and MIL)")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--no-mil", action="store_true", help="skip conversion and the MIL rows")
    p.add_argument("--device-tensors", action="store_true",
                   help="also time each CUDA-graph MIL row with its inputs kept on the device (predict_tensors)")
    p.add_argument("--sequential", action="store_true",
                   help="time each row right after building it and drop it (less memory; default: build all "
                        "rows, then time them in interleaved rounds)")
    p.add_argument("--convert-only", action="store_true", help="only build the cached packages")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA GPU")
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.warmup = (5 if cuda else 1) if args.warmup is None else args.warmup
    args.iters = (20 if cuda else 10) if args.iters is None else args.iters
    args.torch_dtypes = args.torch_dtypes or (["float16"] if cuda else ["float16", "float32"])
    import python_coreml_sd
    print(f"python_coreml_sd {__version__} from {Path(python_coreml_sd.__file__).parent}", flush=True)

    t0 = time.perf_counter()
    unet = build_unet(args.config)
    inputs = mil_inputs(args.config, args.batch)
    print(f"built diffusers UNet ({args.config}) in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = {}
    for attention in [] if args.no_mil else args.attention:
        path = paths[attention] = package_path(args, attention)
        if path.exists() and not args.reconvert:
            print(f"reusing {path}", flush=True)
            continue
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        convert(unet, inputs, path, attention, args.target)
        print(f"converted {attention} with python_coreml_sd.convert.unet in {time.perf_counter() - t0:.0f} s "
              f"-> {path}", flush=True)
        free("cpu")
    if args.convert_only:
        return

    feed = {k: v.numpy() for k, v in inputs.items()}
    sources = [lambda dtype=dtype: torch_rows(unet, inputs, args, getattr(torch, dtype)) for dtype in args.torch_dtypes]
    sources += [lambda a=a, p=p: mil_rows(p, feed, args, a) for a, p in paths.items()]
    rows = time_rows(sources, args)
    print_table(rows, args, f"diffusers eager {args.torch_dtypes[0]}")
    return rows


if __name__ == "__main__":
    main()
