"""Palettize the same UNet with our k-means and with coremltools' k-means, side by side.

    python scripts/bench_palettize.py --config tiny
    python scripts/bench_palettize.py --config sd15 --cap-minutes 15   # full-size SD 1.5, random weights
    python scripts/bench_palettize.py --model-folder DIR --fp16-package PKG --output-psnr torch  # e.g. SDXL

Prints wall time (load + palettize + save, each side in a fresh interpreter), per-tensor weight SNR
(mean / min over palettized tensors, and how many tensors each side has the larger error on) and output
PSNR against the fp16 model (both models run by the MIL runtime on CPU, or PyTorch with --output-psnr torch). When coremltools' full pass
would exceed --cap-minutes (estimated by timing its k-means on a sample of tensors), its time is
extrapolated from the sample and its weight SNR is measured on that sample only: the table says so.

coremltools' k-means (`_get_kmeans_lookup_table_and_weight`) runs the exact 1-D k-means of its bundled
kmeans1d (`coremltools._deps.kmeans1d`) on fp16 tensors of 10,000 elements or more, and scikit-learn's
KMeans on the rest (or on everything, if its kmeans1d cannot be imported). The benchmark stops if that
kmeans1d is missing, and counts which backend each coremltools call used (the "k-means backend" row).
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from python_coreml_sd.compression import testbed  # noqa: E402
from python_coreml_sd.compression.kmeans import palettize_array  # noqa: E402
from python_coreml_sd.compression.palettize import (  # noqa: E402
    WEIGHT_THRESHOLD, lut_weights, palettize_mlpackage)
from python_coreml_sd.package_io import mil_program  # noqa: E402
from python_coreml_sd.metrics import psnr  # noqa: E402


def snr_db(ref, approx):
    ref = ref.astype(np.float64)
    err = np.sum((approx.astype(np.float64) - ref) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref * ref) / err))


def large_consts(pkg):
    import coremltools as ct

    prog = mil_program(ct.models.MLModel(str(pkg), skip_model_load=True))
    return {op.name: op.val.val for f in prog.functions.values() for op in f.operations
            if op.op_type == "const" and isinstance(op.val.val, np.ndarray)
            and op.val.val.dtype == np.float16 and op.val.val.size > WEIGHT_THRESHOLD}


def snr_stats(originals, decoded):
    values = {n: snr_db(originals[n], decoded[n]) for n in decoded}
    return {"tensors": len(values), "snr_mean_db": float(np.mean(list(values.values()))),
            "snr_min_db": float(np.min(list(values.values()))), "snr_db": values}


def worse_count(ours: dict, theirs: dict) -> int:
    """Tensors palettized by both where ours has the larger weight error (lower SNR)."""
    return sum(ours[n] < theirs[n] for n in ours.keys() & theirs.keys())


def output_psnr(src, dst, inputs, how, module=None, torch_inputs=None):
    """Palettized vs fp16 model, both run by the MIL runtime ("mil"); or ("torch") the PyTorch
    module in fp32 with its conv/linear weights replaced by the decoded LUT values, against itself."""
    if how == "mil":
        from python_coreml_sd.runtime.mil import MILModel

        ref = MILModel(src).predict(inputs)["output"]
        return psnr(ref, MILModel(dst).predict(inputs)["output"])
    from python_coreml_sd.compression.recipes import _match
    from python_coreml_sd.compression.sensitivity import palettizable_layers

    # The inner UNet's layer names: a traced wrapper's consts carry its "unet_" prefix, our converter's do not,
    # and _match takes either by suffix.
    layers = palettizable_layers(module.unet)
    with torch.no_grad():
        ref = module(*torch_inputs.values()).numpy()
        saved = {n: m.weight.data.clone() for n, m in layers.items()}
        decoded = lut_weights(ct_model(dst))
        unmatched = [const for const in decoded if _match(const, layers) is None]
        if unmatched:  # an unreplaced weight would leave the output closer to the reference than it is
            raise SystemExit(f"{len(unmatched)} palettized weights match no layer of the PyTorch UNet "
                             f"(e.g. {unmatched[0]}): is --fp16-package converted from --model-folder?")
        for const, values in decoded.items():
            name = _match(const, layers)
            layers[name].weight.data = torch.from_numpy(values.astype(np.float32)).reshape(saved[name].shape)
        out = module(*torch_inputs.values()).numpy()
        for n, w in saved.items():
            layers[n].weight.data = w
    return psnr(ref, out)


KMEANS1D_MISSING = ("coremltools' kmeans1d (coremltools._deps.kmeans1d) failed to import, so coremltools would "
                    "palettize with scikit-learn only: reinstall coremltools==9.0, which bundles it (pip install "
                    "kmeans1d gives a separate package that coremltools does not import)")


def require_kmeans1d() -> None:
    """coremltools at its best: with its bundled kmeans1d. Exit with one line if it is missing."""
    from coremltools._deps import _HAS_KMEANS1D

    if not _HAS_KMEANS1D:
        raise SystemExit(KMEANS1D_MISSING)


def count_kmeans_backends() -> dict:
    """Wrap the two k-means coremltools can call; returns {backend: {"calls": n, "elements": m}}, filled as
    they run. The wrappers only count: they pass every argument through and return what they returned."""
    import sklearn.cluster
    from coremltools.models.neural_network import quantization_utils as qu

    counts = {"kmeans1d": {"calls": 0, "elements": 0}, "scikit-learn": {"calls": 0, "elements": 0}}
    cluster, fit = qu._kmeans1d.cluster, sklearn.cluster.KMeans.fit

    class Kmeans1d:
        @staticmethod
        def cluster(values, k, **kw):
            counts["kmeans1d"]["calls"] += 1
            counts["kmeans1d"]["elements"] += int(np.sum(kw["weights"])) if "weights" in kw else len(values)
            return cluster(values, k, **kw)

    def counted_fit(self, x, *a, **kw):
        counts["scikit-learn"]["calls"] += 1
        counts["scikit-learn"]["elements"] += int(np.size(x))
        return fit(self, x, *a, **kw)

    qu._kmeans1d = Kmeans1d
    sklearn.cluster.KMeans.fit = counted_fit
    return counts


def describe_backends(counts: dict) -> str:
    used = [f"{name} on {c['calls']} tensors ({c['elements'] / 1e6:.1f} M values)"
            for name, c in counts.items() if c["calls"]]
    return ", ".join(used) or "none"


def palettize_in_child(which: str, src: Path, dst: Path, nbits: int) -> dict:
    """{"wall_s": load + palettize + save in a fresh interpreter (imports not counted), "kmeans_backends":
    what coremltools' k-means calls used (None for ours)}, the source's
    weights read into the page cache first: neither side pays for this process's memory or for disk
    reads (this machine keeps only ~3 GB of page cache, and the harness's own reads evict the package)."""
    for blob in src.rglob("*.bin"):  # same start for both sides: the weights in the page cache, not on disk
        with open(blob, "rb") as f:
            while f.read(1 << 24):
                pass
    shutil.rmtree(dst, ignore_errors=True)  # a previous run's output in a reused --work-dir
    cmd = [sys.executable, __file__, "--child", which, "--src", str(src), "--dst", str(dst), "--nbits", str(nbits)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(which: str, src: Path, dst: Path, nbits: int) -> None:
    import coremltools.optimize.coreml as cto

    counts = None
    if which == "coremltools":
        require_kmeans1d()
        counts = count_kmeans_backends()
    t0 = time.perf_counter()
    if which == "ours":
        palettize_mlpackage(src, dst, nbits)
    else:
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=nbits))
        cto.palettize_weights(ct_model(src), config).save(str(dst))
    print(json.dumps({"wall_s": time.perf_counter() - t0, "kmeans_backends": counts}))


def run_ours(src, work, nbits):
    """Our pass in a child, while this process holds no weights (the same start as coremltools' child)."""
    dst = work / "ours.mlpackage"
    return dst, {"wall_s": palettize_in_child("ours", src, dst, nbits)["wall_s"]}


def ours_stats(originals, dst, nbits):
    t0 = time.perf_counter()
    for w in originals.values():
        palettize_array(w, nbits)
    kmeans_only = time.perf_counter() - t0
    return {"kmeans_only_s": kmeans_only, **snr_stats(originals, lut_weights(ct_model(dst)))}


def release_memory() -> None:
    """Give freed weights back to the system: coremltools' reader allocates them with malloc, whose heap keeps
    them after ``del`` (5.1 GB of SDXL's stayed in this process's RSS; malloc_trim brings it to 0.4 GB)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def ct_model(path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True)


def coremltools_sample(originals, nbits, count, max_fraction=1.0):
    """coremltools' own per-tensor k-means on ``count`` tensors spread over the size range."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    counts = count_kmeans_backends()
    names = sorted(originals, key=lambda n: originals[n].size)
    picks = [names[int(i)] for i in np.linspace(0, max_fraction * (len(names) - 1), count).round()]
    seconds, snrs = 0.0, {}
    for name in dict.fromkeys(picks):
        w = originals[name]
        t0 = time.perf_counter()
        lut, labels = _get_kmeans_lookup_table_and_weight(nbits, w)
        seconds += time.perf_counter() - t0
        dense = lut.reshape(-1).astype(w.dtype)[labels].reshape(w.shape)
        ours_lut, ours_idx = palettize_array(w, nbits)
        snrs[name] = (snr_db(w, dense), snr_db(w, ours_lut[ours_idx]))
        print(f"  sample {name} {w.shape}: coremltools {seconds:.1f}s so far, SNR ct {snrs[name][0]:.2f} dB"
              f" / ours {snrs[name][1]:.2f} dB", flush=True)
    elements = sum(originals[n].size for n in snrs)
    print(f"  coremltools k-means backend on the sample: {describe_backends(counts)}", flush=True)
    return seconds, elements, snrs, counts


def run_coremltools(src, work, nbits):
    """coremltools' pass in a child, then its weights against the fp16 ones (read again here: this process
    holds none while the child runs, which needs about 22 GB for SDXL)."""
    dst = work / "coremltools.mlpackage"
    child = palettize_in_child("coremltools", src, dst, nbits)
    decoded = lut_weights(ct_model(dst))
    print(f"coremltools k-means backend: {describe_backends(child['kmeans_backends'])}", flush=True)
    return dst, {**child, **snr_stats(large_consts(src), decoded)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=testbed.UNET_CONFIGS, default="tiny")
    p.add_argument("--nbits", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap-minutes", type=float, default=15.0,
                   help="run coremltools' full pass only if its estimated time is below this")
    p.add_argument("--sample", type=int, default=6, help="tensors timed to estimate coremltools' full pass")
    p.add_argument("--output-psnr", choices=("mil", "torch"), default="mil",
                   help="mil: palettized vs fp16 model in the MIL runtime; torch: PyTorch fp32 with decoded weights")
    p.add_argument("--max-sample-fraction", type=float, default=1.0,
                   help="time coremltools only on tensors up to this size quantile (its largest take minutes each)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep packages here; an fp16.mlpackage already there (same --config/--seed) is reused")
    p.add_argument("--model-folder", type=Path, default=None,
                   help="instead of --config: a diffusers model folder (e.g. python_coreml_sd.random_models' "
                        "full-size SDXL), whose UNet --fp16-package was converted from; needs --output-psnr torch")
    p.add_argument("--fp16-package", type=Path, default=None,
                   help="with --model-folder: its UNet converted by our converter (scripts/bench_unet_conversion.py "
                        "--keep writes one); a full-size SDXL UNet traced and converted in this process would not "
                        "fit in 24 GiB beside the benchmark")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", choices=("ours", "coremltools"), help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.src, args.dst, args.nbits)
    require_kmeans1d()
    if args.model_folder and (args.fp16_package is None or args.output_psnr != "torch"):
        p.error("--model-folder needs --fp16-package and --output-psnr torch")
    if args.fp16_package and not (args.fp16_package / "Manifest.json").is_file():
        p.error(f"--fp16-package {args.fp16_package} is not an .mlpackage (no Manifest.json)")
    source = model_source(args.model_folder, p) if args.model_folder else None  # a bad folder stops here

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_palettize_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"config": str(args.model_folder or args.config), "nbits": args.nbits, "cpu_count": os.cpu_count()}
    t0 = time.perf_counter()
    src, subject = fp16_source(args, work, source)
    result["convert_s"] = time.perf_counter() - t0
    print(f"converted {result['config']} in {result['convert_s']:.0f}s", flush=True)
    ours_pkg, result["ours"] = run_ours(src, work, args.nbits)
    originals = large_consts(src)
    result["tensors"] = len(originals)
    result["elements"] = int(sum(w.size for w in originals.values()))
    print(f"{len(originals)} weights > {WEIGHT_THRESHOLD} elements, {result['elements'] / 1e6:.1f} M values", flush=True)
    result["ours"].update(ours_stats(originals, ours_pkg, args.nbits))
    print("ours:", json.dumps({k: v for k, v in result["ours"].items() if k != "snr_db"}), flush=True)

    seconds, elements, snrs, counts = coremltools_sample(originals, args.nbits, args.sample, args.max_sample_fraction)
    estimate = seconds * result["elements"] / elements
    result["coremltools_sample"] = {"seconds": seconds, "elements": int(elements), "estimate_full_s": estimate,
                                    "kmeans_backends": counts,
                                    "snr_db": {n: {"coremltools": a, "ours": b} for n, (a, b) in snrs.items()}}
    print(f"coremltools k-means estimate for the whole model: {estimate:.0f}s", flush=True)
    ct_pkg = None
    if estimate <= args.cap_minutes * 60:
        del originals
        release_memory()
        ct_pkg, result["coremltools"] = run_coremltools(src, work, args.nbits)
        result["ours"]["worse_tensors"] = worse_count(result["ours"]["snr_db"], result["coremltools"]["snr_db"])
        result["coremltools"]["worse_tensors"] = worse_count(result["coremltools"]["snr_db"], result["ours"]["snr_db"])
    else:
        result["coremltools"] = {"wall_s_estimated": estimate, "capped": True, "kmeans_backends": counts}
    # Output PSNR last, after the weights are released: a full-size SDXL module in fp32 (10 GB) beside them and a
    # palettizer child would not fit in 24 GiB.
    originals = None
    result["output_psnr_by"] = args.output_psnr
    model, inputs = subject()
    psnr_args = (testbed.numpy_inputs(inputs), args.output_psnr, model, inputs)
    for side, pkg in (("ours", ours_pkg), ("coremltools", ct_pkg)):
        if pkg is not None:
            result[side]["output_psnr_db"] = output_psnr(src, pkg, *psnr_args)
            print(f"{side} output PSNR {result[side]['output_psnr_db']:.2f} dB", flush=True)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def fp16_source(args, work: Path, source):
    """(the fp16 package both sides palettize, a function giving (wrapped UNet, batch-1 inputs) for the output
    PSNR): --config's UNet, built in memory and traced, or --model-folder's (``source``) with its --fp16-package."""
    if source is not None:
        return args.fp16_package, lambda: folder_unet(source, args.seed)
    model, inputs = testbed.unet(args.config, args.seed)
    src = work / "fp16.mlpackage"
    if src.is_dir():  # a --work-dir of an earlier run with the same config and seed
        print(f"reusing {src}", flush=True)
    else:
        src = testbed.convert(model, inputs, src)
    return src, lambda: (model, inputs)


def model_source(folder: Path, parser):
    from python_coreml_sd.errors import UserError
    from python_coreml_sd.model_sources import resolve

    try:
        return resolve(str(folder))
    except UserError as err:
        parser.error(str(err))


def folder_unet(source, seed: int):
    """The source's UNet in fp32, as the converter reads it (model_sources), with batch-1 inputs of its shapes."""
    from python_coreml_sd.components import text_pooled_width
    from python_coreml_sd.layers.unet import DiffusersUNet

    unet = source.load_unet().eval()
    inputs = testbed.unet_inputs(unet.config, source.text_positions(), seed, text_pooled=text_pooled_width(source))
    return DiffusersUNet(unet).eval(), inputs


def print_table(r):
    ours, ct_ = r["ours"], r["coremltools"]
    sample = r["coremltools_sample"]["snr_db"]
    print(f"\n{r['config']} UNet, {r['nbits']}-bit, {r['tensors']} tensors, {r['elements'] / 1e6:.1f} M weights,"
          f" {r['cpu_count']} CPUs")
    print("| | ours | coremltools kmeans |\n| --- | --- | --- |")
    backends = describe_backends(ct_["kmeans_backends"])
    print(f"| k-means backend | ours (compression/kmeans.py) | {backends}{' (sample)' if ct_.get('capped') else ''} |")
    if ct_.get("capped"):
        print(f"| wall time | {ours['wall_s']:.1f} s | ~{ct_['wall_s_estimated']:.0f} s (extrapolated from "
              f"{len(sample)} tensors, not run) |")
        ct_snr = [v["coremltools"] for v in sample.values()]
        our_snr = [v["ours"] for v in sample.values()]
        print(f"| weight SNR mean / min (sampled tensors) | {np.mean(our_snr):.2f} / {np.min(our_snr):.2f} dB |"
              f" {np.mean(ct_snr):.2f} / {np.min(ct_snr):.2f} dB |")
        print(f"| weight SNR mean / min (all tensors) | {ours['snr_mean_db']:.2f} / {ours['snr_min_db']:.2f} dB | n/a |")
        print(f"| output PSNR vs fp16 | {ours['output_psnr_db']:.2f} dB | not measured (not run) |")
    else:
        print(f"| wall time | {ours['wall_s']:.1f} s | {ct_['wall_s']:.1f} s |")
        print(f"| speed-up | {ct_['wall_s'] / ours['wall_s']:.1f}x | 1x |")
        print(f"| weight SNR mean / min | {ours['snr_mean_db']:.2f} / {ours['snr_min_db']:.2f} dB |"
              f" {ct_['snr_mean_db']:.2f} / {ct_['snr_min_db']:.2f} dB |")
        print(f"| output PSNR vs fp16 | {ours['output_psnr_db']:.2f} dB | {ct_['output_psnr_db']:.2f} dB |")
        print(f"| tensors worse than the other | {ours['worse_tensors']} | {ct_['worse_tensors']} |")
    print(f"(ours: k-means alone, in one process, {ours['kmeans_only_s']:.1f} s; output PSNR by {r['output_psnr_by']})")


if __name__ == "__main__":
    main()
