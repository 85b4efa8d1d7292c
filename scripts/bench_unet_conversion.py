"""Benchmark: full-size SD 1.5 UNet (random weights, fixed seed) -> Core ML, the plain paths vs ours.

Every path starts where a user starts: a diffusers folder on disk (--model-folder; by default the
random-weight folder of --family and --seed that python_coreml_sd.random_models writes once into its
cache). Rows (each path in a fresh subprocess; wall time, and CPU time and peak RSS from os.wait4 of
that child):

  plain: jit.trace(check_trace=False) + ct.convert     UNet2DConditionModel.from_pretrained -> torch.jit.trace
                                                        -> ct.convert -> MLModel.save
  plain: torch.export + ct.convert                      UNet2DConditionModel.from_pretrained -> torch.export.export
                                                        -> .run_decompositions({}) -> ct.convert -> MLModel.save
  plain: jit.trace(check_trace=True) + ct.convert       only with --with-check-trace (torch.jit.trace's default)
  ours: torch2coreml.convert (SPLIT_EINSUM)             python_coreml_sd.torch2coreml.convert(options, ["unet"]),
                                                        the library call behind the CLI's --convert-unet

Every path converts to an fp16 ML Program (macOS13 target, skip_model_load=True). "best plain" is, per
column, the best plain row that succeeded (lowest wall time, CPU time, peak RSS); a plain path that
fails shows its error instead of numbers. Afterwards each package runs on the MIL runtime against the
diffusers UNet of the same folder in fp32 (--agreement none skips it).

    python scripts/bench_unet_conversion.py [--family sd1] [--latent 64] [--only trace export ours] [--repeat 2]
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

PLAIN = ("trace", "export", "trace_checked")
PATHS = ("trace", "export", "trace_checked", "ours")


def label(which: str, args) -> str:
    return {"trace": "plain: jit.trace(check_trace=False) + ct.convert",
            "trace_checked": "plain: jit.trace(check_trace=True) + ct.convert",
            "export": "plain: torch.export + ct.convert",
            "ours": f"ours: torch2coreml.convert ({args.attention_implementation})"}[which]


def load_diffusers_unet(folder: Path):
    """The UNet of a diffusers folder, loaded as a plain script loads it."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()


def model_folder(args) -> Path:
    """--model-folder, or the random-weight folder of --family and --seed (written on first use)."""
    if args.model_folder:
        return args.model_folder.resolve()
    from python_coreml_sd.random_models import materialized_model_dir
    return materialized_model_dir(args.family, args.seed)


def warm_page_cache(folder: Path) -> None:
    """Read the UNet's files once, so that no path (the first one run, say) pays for reading the disk."""
    for path in sorted((folder / "unet").iterdir()):
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


def bench_inputs(unet, latent: int, folder: Path):
    """Our converter's sample inputs: encoder_hidden_states in the (B, C, 1, S) layout (SDXL: the added
    conditions too, text_embeds as wide as the folder's text_encoder_2 pools)."""
    from python_coreml_sd.convert.unet import sample_inputs, text_pooled_width
    from python_coreml_sd.model_sources import resolve
    return sample_inputs(dict(unet.config), 2, latent, latent, 77, text_pooled_width(resolve(str(folder))))


def diffusers_layout(inputs: dict) -> dict:
    """The same inputs with encoder_hidden_states as diffusers takes it, (B, S, C)."""
    out = dict(inputs)
    out["encoder_hidden_states"] = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2).contiguous()
    return out


def plain_convert(model, inputs: dict):
    """ct.convert as a plain script calls it (default pass pipeline), for a traced or exported model."""
    import coremltools as ct
    import numpy as np
    return ct.convert(model, convert_to="mlprogram",
                      inputs=[ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.float32) for k, v in inputs.items()],
                      outputs=[ct.TensorType(name="noise_pred", dtype=np.float32)],
                      compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.macOS13,
                      skip_model_load=True)


def child_plain(args, out: Path, which: str) -> dict:
    import torch

    from python_coreml_sd.layers.unet import DiffusersUNet

    phases, start = {}, time.perf_counter()

    def phase(name):
        phases[name] = time.perf_counter() - start - sum(phases.values())

    unet = load_diffusers_unet(args.model_folder)
    inputs = bench_inputs(unet, args.latent, args.model_folder)  # the converted UNet's layout, as DiffusersUNet takes it
    phase("load")
    with torch.no_grad():
        if which == "export":
            model = torch.export.export(DiffusersUNet(unet).eval(), tuple(inputs.values()))
            phase("export")
            # coremltools takes the ATEN dialect; torch.export gives TRAINING, and ct.convert's own error
            # message says to call run_decompositions({}) first.
            model = model.run_decompositions({})
            phase("decompose")
        else:
            model = torch.jit.trace(DiffusersUNet(unet).eval(), tuple(inputs.values()),
                                    check_trace=which == "trace_checked")
            phase("trace")
    mlmodel = plain_convert(model, inputs)
    phase("convert")
    mlmodel.save(str(out))
    phase("save")
    return phases


def child_ours(args, out: Path) -> dict:
    import logging

    from python_coreml_sd.convert import ConversionOptions
    from python_coreml_sd.torch2coreml import convert

    # Our stage-by-stage memory log only: a root handler at INFO would also print coremltools' per-op
    # INFO lines (thousands on a UNet), which the plain paths do not pay for.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log = logging.getLogger("python_coreml_sd")
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    log.propagate = False
    start = time.perf_counter()
    written = out.parent / f"{out.stem}_output"
    options = ConversionOptions(str(args.model_folder), written, latent_h=args.latent, latent_w=args.latent,
                                attention_implementation=args.attention_implementation, overwrite=True)
    (package,) = convert(options, ["unet"])
    phases = {"load+trace+convert+save": time.perf_counter() - start}
    shutil.rmtree(out, ignore_errors=True)  # an earlier repeat's
    package.rename(out)
    written.rmdir()
    return phases


def child_agreement(args, workdir: Path) -> dict:
    """PSNR of each saved fp16 package (MIL runtime, CPU) against the diffusers UNet in fp32, same inputs."""
    import gc

    from python_coreml_sd.convert.unet import diffusers_reference
    from python_coreml_sd.metrics import psnr
    from python_coreml_sd.runtime.mil import MILModel
    unet = load_diffusers_unet(args.model_folder)
    inputs = bench_inputs(unet, args.latent, args.model_folder)
    reference = diffusers_reference(unet, inputs)
    del unet
    gc.collect()
    results = {}
    for which in args.paths:
        package = workdir / f"{which}.mlpackage"
        if not package.exists():
            continue
        try:
            model = MILModel(str(package))
            rank = len(model.input_description["encoder_hidden_states"].shape)
            feed = inputs if rank == 4 else diffusers_layout(inputs)  # ours (B, C, 1, S), plain (B, S, C)
            results[which] = psnr(reference, model.predict({k: v.numpy() for k, v in feed.items()})["noise_pred"])
        except Exception as exc:  # report, don't hide the other rows
            results[which] = f"{type(exc).__name__}: {exc}"
        model = None
        gc.collect()
        print(f"agreement {which}: {results[which]}", flush=True)
    return results


def run_child(which: str, args, workdir: Path) -> dict:
    """Run one path in a fresh interpreter; returns its phases (or error), wall time and peak RSS (GiB)."""
    report = workdir / f"{which}.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", which, "--workdir", str(workdir), "--family", args.family,
           "--latent", str(args.latent), "--seed", str(args.seed), "--model-folder", str(args.model_folder),
           "--attention-implementation", args.attention_implementation, "--only", *args.paths]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    result = json.loads(report.read_text()) if report.exists() else {}
    if status != 0 and "error" not in result:
        code = os.waitstatus_to_exitcode(status)
        result["error"] = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    # CPU time (user + system) of the child: less sensitive than wall time to other processes on a
    # shared machine. ru_maxrss is KiB on Linux.
    result.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_gib=usage.ru_maxrss / 2**20)
    return result


def fastest(runs: list) -> dict:
    """Of a path's repeats, the one with the lowest wall time (other processes only ever add time); the
    first error if every repeat failed."""
    ok = [r for r in runs if "error" not in r]
    return min(ok, key=lambda r: r["wall_s"]) if ok else runs[0]


def weights_gib(package: Path) -> float:
    return sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) / 2**30


def best_plain(results: dict, key: str):
    ok = [w for w in PLAIN if w in results and "error" not in results[w]]
    return min(ok, key=lambda w: results[w][key]) if ok else None


def print_table(results: dict, agreement: dict, args) -> None:
    repeats = f"; fastest of {args.repeat} runs per path" if args.repeat > 1 else ""
    print(f"\nSD UNet '{args.family}', latent {args.latent}x{args.latent}, batch 2, fp16, macOS13; "
          f"{os.cpu_count()} CPU cores visible, {len(os.sched_getaffinity(0))} usable{repeats}")
    head = ("path", "wall (s)", "CPU (s)", "peak RSS (GiB)", "package (GiB)", "PSNR vs diffusers fp32")
    print("| " + " | ".join(head) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for which in args.paths:
        r = results[which]
        psnr = agreement.get(which, "")
        psnr = f"{psnr:.1f} dB" if isinstance(psnr, float) else ("" if not psnr else "failed")
        if "error" in r:
            print(f"| {label(which, args)} | failed: {r['error']} | | {r['peak_rss_gib']:.2f} | | |")
        else:
            print(f"| {label(which, args)} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                  f"{r['package_gib']:.2f} | {psnr} |")
    best = {key: best_plain(results, key) for key in ("wall_s", "cpu_s", "peak_rss_gib")}
    if "ours" in results and "error" not in results["ours"] and best["wall_s"]:
        ours = results["ours"]
        ratios = [f"{ours[key] / results[which][key]:.2f}x" for key, which in best.items()]
        print(f"| ours / best plain | {' | '.join(ratios)} | | |")
        print("best plain: " + "; ".join(f"{name} = {label(best[key], args)}" for key, name in
                                         (("wall_s", "wall"), ("cpu_s", "CPU"), ("peak_rss_gib", "peak RSS"))))
    for which in args.paths:
        if "error" not in results[which]:
            print(f"phases {label(which, args)}:", {k: round(v, 1) for k, v in results[which]["phases"].items()})
        else:
            print(f"{label(which, args)} failed: {results[which]['error']}")


def child_main(args) -> None:
    out = args.workdir / f"{args.child}.mlpackage"
    report = args.workdir / f"{args.child}.json"
    try:
        if args.child == "agreement":
            result = {"psnr_db": child_agreement(args, args.workdir)}
        elif args.child == "ours":
            result = {"phases": child_ours(args, out)}
        else:
            result = {"phases": child_plain(args, out, args.child)}
    except Exception as exc:
        import traceback
        traceback.print_exc()
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        report.write_text(json.dumps({"error": message[:300]}))
        raise SystemExit(1)
    report.write_text(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-folder", type=Path,
                        help="the diffusers folder every path converts (default: the random-weight folder of "
                             "--family and --seed)")
    parser.add_argument("--attention-implementation", default="SPLIT_EINSUM")
    parser.add_argument("--with-check-trace", action="store_true",
                        help="also run the plain path with torch.jit.trace's default check_trace=True "
                             "(a second and third forward pass plus a graph comparison)")
    parser.add_argument("--only", nargs="+", choices=PATHS, dest="paths", help="run these paths only")
    parser.add_argument("--agreement", choices=("all", "none"), default="all",
                        help="run each package on the MIL runtime against the diffusers UNet in fp32")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the paths this many times (every other round in reverse order) and report "
                             "each path's fastest run")
    parser.add_argument("--keep", type=Path, help="keep the packages in this folder")
    parser.add_argument("--child", choices=PATHS + ("agreement",), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paths is None:
        args.paths = ["trace", "export"] + (["trace_checked"] if args.with_check_trace else []) + ["ours"]
    if args.child:
        return child_main(args)
    import python_coreml_sd
    print(f"python_coreml_sd from {Path(python_coreml_sd.__file__).parent}", flush=True)
    args.model_folder = model_folder(args)
    print(f"model folder {args.model_folder}", flush=True)
    warm_page_cache(args.model_folder)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_unet_", dir=args.keep))
    try:
        runs = {which: [] for which in args.paths}
        for repeat in range(args.repeat):
            # Every other round in reverse order, so that a drift in machine load favours no path.
            for which in (args.paths if repeat % 2 == 0 else args.paths[::-1]):
                result = run_child(which, args, workdir)
                if "error" not in result:
                    result["package_gib"] = weights_gib(workdir / f"{which}.mlpackage")
                runs[which].append(result)
                print(label(which, args), json.dumps(result), flush=True)
        results = {which: fastest(r) for which, r in runs.items()}
        agreement = {}
        if args.agreement == "all":
            agreement = run_child("agreement", args, workdir).get("psnr_db", {})
        print_table(results, agreement, args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
