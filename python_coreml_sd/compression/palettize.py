"""Palettize an ML Program's weights with our k-means, through coremltools' own compression pass.

coremltools' ``palettize_weights`` pass does the graph surgery and writes ``constexpr_lut_to_dense``
ops (the format Core ML runs on device); we only replace how each look-up table is computed, via
its ``mode="custom"`` hook. So the file format is Apple's, byte layout included, and only the
clustering differs (faster, and at least as accurate as its scikit-learn k-means).

The pass asks for one LUT at a time. For a large model we cluster every weight ahead of it instead,
in a pool of worker processes (``LutPlan``), and the pass picks each result up.

Library API (what the converter's ``--quantize-nbits`` / ``--mixed-bit-recipe`` call):
``palettize_mlpackage(src, dst, nbits, ...)`` and ``palettize_model(mlmodel, nbits, ...)``.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from unittest import mock

import numpy as np

from python_coreml_sd.compression.kmeans import SUPPORTED_NBITS, cluster_fp16, pack_bits, palettize_array
from python_coreml_sd.compression.recipes import KEEP_FP16, recipe_to_const_names
from python_coreml_sd.errors import UserError
from python_coreml_sd.lut import lut_iOS16, lut_iOS18
from python_coreml_sd.package_check import check_package
from python_coreml_sd.package_io import mil_program, save_mlmodel, unprinted_programs

# Same default as coremltools: tensors of at most this many elements (biases, norms) stay fp16.
WEIGHT_THRESHOLD = 2048
GRANULARITIES = ("per_tensor", "per_grouped_channel")
IOS16_SPEC_VERSION = 7  # the floor coremltools' own compression entry points use
IOS18_SPEC_VERSION = 9  # 3-bit LUTs and per_grouped_channel need the iOS 18 constexpr_lut_to_dense
# Clustering ahead in worker processes pays off above this many weight values: on `tiny`'s UNet
# (1.4 M) 3.4-3.8 s instead of 6.1 s on 2 cores; the unit tests' 0.1 M-value nets stay in-process.
PARALLEL_MIN_VALUES = 1_000_000

log = logging.getLogger(__name__)


class LutPlan:
    """Clusterings of the weights the pass is about to palettize, computed ahead in worker processes.

    Workers are forked after the program is loaded and read the weights from the memory they share
    with us (nothing O(size) is pickled); each returns the tensor's distinct values, counts and
    centroids. The pass's look-up is by array identity (the pass hands us a view of the same const),
    and a weight that was not planned is clustered on the spot.
    """

    def __init__(self):
        self._pool = None
        self._futures = {}

    def start(self, weights_and_bits, workers: int) -> None:
        global _PLANNED
        # fork: workers start at once and see _PLANNED; spawn would re-import the caller's __main__,
        # which breaks scripts without a main guard, and could not see the weights. Without fork,
        # everything is clustered in-process. Workers only run numpy code.
        if "fork" not in multiprocessing.get_all_start_methods():
            return
        planned = [(w, bits) for w, bits in weights_and_bits if w.dtype == np.float16]
        _PLANNED = [w for w, _ in planned]  # read by the forked workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
        for index, (weight, bits) in enumerate(planned):
            self._futures[_identity(weight), 1 << bits] = self._pool.submit(_cluster_planned, index, 1 << bits)

    def clustering(self, weight: np.ndarray, k: int):
        """``cluster_fp16(weight, k)`` if it was planned (waiting for it if needed), else None."""
        future = self._futures.get((_identity(weight), k)) if self._futures else None
        if future is None:
            return None
        try:
            return future.result()
        except BrokenProcessPool as err:  # a worker died: the caller computes the same result itself
            log.warning("palettize: worker pool failed (%s); clustering in-process", err)
            self._futures.clear()
            return None

    def close(self) -> None:
        global _PLANNED
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._pool, self._futures, _PLANNED = None, {}, []


_PLANNED: list = []


def _cluster_planned(index: int, k: int):
    return cluster_fp16(_PLANNED[index], k)


def _identity(w: np.ndarray) -> tuple:
    return w.__array_interface__["data"][0], w.shape, w.strides, w.dtype.str


def lut_function(nbits: int, plan: LutPlan | None = None, device: str | None = None):
    """coremltools ``lut_function`` for ``mode="custom"``: our k-means at ``nbits``."""

    def compute(weight: np.ndarray):
        clustering = plan.clustering(weight, 1 << nbits) if plan else None
        lut, indices = palettize_array(weight, nbits, device=device, clustering=clustering)
        return lut, indices.reshape(-1)

    compute.__name__ = f"kmeans_{nbits}bit"
    return compute


def op_config(nbits: int, granularity: str = "per_tensor", group_size: int = 32,
              weight_threshold: int = WEIGHT_THRESHOLD, plan: LutPlan | None = None, device: str | None = None):
    import coremltools.optimize.coreml as cto

    _check_args(nbits, granularity, group_size)
    return cto.OpPalettizerConfig(
        mode="custom", lut_function=lut_function(nbits, plan, device), granularity=granularity,
        group_size=group_size, weight_threshold=weight_threshold,
    )


def palettize_model(mlmodel, nbits: int | None, granularity: str = "per_tensor", group_size: int = 32,
                    recipe: dict | None = None, weight_threshold: int = WEIGHT_THRESHOLD, device: str = "auto"):
    """Palettized copy of an in-memory ``ct.models.MLModel`` (ML Program).

    ``nbits`` applies to every large weight; ``recipe`` (layer or const name -> bits, 16 = keep fp16)
    overrides it per weight, and with ``nbits=None`` only the recipe's weights are palettized.
    ``device``: where the O(size) histogram and gather run ("cpu", "cuda"; "auto": CUDA when PyTorch
    sees a GPU). The LUTs are the same either way.
    """
    import coremltools.optimize.coreml as cto

    if nbits is None and not recipe:
        raise UserError("palettize: give nbits, a recipe, or both")
    device = None if resolve_device(device) == "cpu" else "cuda"
    plan = LutPlan()
    bits_of = {} if nbits is None else {None: nbits}

    def config_for(bits):
        return op_config(bits, granularity, group_size, weight_threshold, plan, device)

    config = cto.OptimizationConfig(global_config=None if nbits is None else config_for(nbits))
    if recipe:
        consts = [op.name for f in mil_program(mlmodel).functions.values() for op in f.operations
                  if op.op_type == "const"]
        for const, bits in recipe_to_const_names(consts, recipe).items():
            config.set_op_name(const, None if bits == KEEP_FP16 else config_for(bits))
            bits_of[const] = None if bits == KEEP_FP16 else bits
    if 3 in bits_of.values() and mlmodel.get_spec().specificationVersion < IOS18_SPEC_VERSION:
        raise UserError("palettize: 3 bits needs the model converted for iOS 18 / macOS 15 or later "
                        "(before that Core ML's look-up tables hold 2, 4, 16, 64 or 256 entries)")
    try:
        return _apply_palettizer(mlmodel, config, plan, bits_of if granularity == "per_tensor" else {})
    except ValueError as err:
        if "iOS18" in str(err):
            raise UserError(f"{err} (per_grouped_channel needs the model converted for iOS 18 or later)") from err
        raise
    finally:
        plan.close()


def _apply_palettizer(mlmodel, config, plan: LutPlan, bits_of: dict):
    """What ``cto.palettize_weights`` does, minus re-running the default optimization pipeline on
    the already-optimized program (the saved package is byte-identical and 3-4x faster to make), plus
    clustering the weights ahead in parallel (``bits_of``: const name or None (every other) -> bits)."""
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize import _utils as optimize_utils

    palettizer = PASS_REGISTRY["compression::palettize_weights"]
    palettizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    spec = mlmodel.get_spec()
    version = max(spec.specificationVersion, IOS16_SPEC_VERSION)
    with _gc_frozen():
        prog = mil_program(mlmodel, version)
        planned = list(_planned_weights(prog, palettizer, bits_of))
        workers = worker_count()
        if workers > 1 and sum(w.size for w, _ in planned) >= PARALLEL_MIN_VALUES:
            plan.start(planned, workers)
        packer = _fast_packer(optimize_utils.pack_elements_into_bits)
        with mock.patch.object(optimize_utils, "pack_elements_into_bits", packer), unprinted_programs():
            palettizer.apply(prog)
            return mil_convert(prog, convert_to="mlprogram", convert_from="milinternal", specification_version=version,
                               compute_units=mlmodel.compute_unit, model_description=spec.description,
                               skip_model_load=True, pass_pipeline=PassPipeline.EMPTY)


def _fast_packer(original):
    """coremltools' index packer `original`, the same bytes 10x faster (kmeans.pack_bits); what is
    not valid unsigned indices goes to `original`, for its checks and messages."""
    def pack(elements: np.ndarray, nbits: int) -> np.ndarray:
        if not np.issubdtype(elements.dtype, np.unsignedinteger) or elements.max(initial=0) >= 1 << nbits:
            return original(elements, nbits)
        return pack_bits(elements, nbits)

    return pack


@contextlib.contextmanager
def _gc_frozen():
    """Keep the caller's objects out of the garbage collector while we work.

    Loading a program makes hundreds of thousands of objects, and every full collection then walks
    everything the caller holds too (a converter's leftovers, a PyTorch model): in such a process
    loading SD 1.5's UNet took 9.7 s instead of 2.6 s. Frozen objects are also never written by the
    collector in forked workers, so their pages stay shared.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for a user's "auto" / "cpu" / "cuda"."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda', but PyTorch sees no CUDA GPU; use 'cpu' or 'auto'")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def worker_count() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _planned_weights(prog, palettizer, bits_of: dict):
    """(weight, bits) for each const the pass will palettize, by the pass's own selection rules."""
    if not bits_of:
        return
    for func in prog.functions.values():
        with func:  # the pass's checks read the opset of the enclosing block
            for op in func.operations:  # weights are top-level consts
                if not palettizer.is_valid_op(op):
                    continue
                cfg = palettizer.config._get_const_op_config(op)
                if cfg is None or not palettizer.need_compress_const(op, False, cfg.weight_threshold):
                    continue
                bits = bits_of.get(op.name, bits_of.get(None))
                if bits is not None:
                    yield op.outputs[0].val, bits


def palettize_mlpackage(src, dst, nbits: int | None, granularity: str = "per_tensor", group_size: int = 32,
                        recipe: dict | None = None, overwrite: bool = False,
                        weight_threshold: int = WEIGHT_THRESHOLD, device: str = "auto") -> Path:
    """Palettize the ``.mlpackage`` at ``src`` into ``dst``; returns ``dst``.

    Writes into a temporary folder beside ``dst`` and renames it into place, so an interrupted run
    never leaves a half-written package; an existing ``dst`` is replaced only with ``overwrite``.
    """
    import coremltools as ct

    src, dst = Path(src), Path(dst)
    if not (src / "Manifest.json").is_file():
        raise UserError(f"{src} is not an .mlpackage (no Manifest.json)")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists; pass overwrite=True (or choose another path) to replace it")
    if src.resolve() == dst.resolve():
        raise UserError("palettize: src and dst must differ (the source is read while writing)")
    _check_args(nbits, granularity, group_size)
    check_package(src)
    model = ct.models.MLModel(str(src), skip_model_load=True)
    palettized = palettize_model(model, nbits, granularity, group_size, recipe, weight_threshold, device)
    return save_mlmodel(palettized, dst, overwrite)


def _check_args(nbits, granularity, group_size):
    if nbits is not None and nbits not in SUPPORTED_NBITS:
        raise UserError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits}")
    if granularity not in GRANULARITIES:
        raise UserError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_grouped_channel" and (not isinstance(group_size, int) or group_size < 1):
        raise UserError(f"group_size must be a positive integer, got {group_size!r}")


def lut_weights(mlmodel) -> dict:
    """{const name: dense fp16 values} for every ``constexpr_lut_to_dense`` op, decoded from the LUT.

    Names are the original const names (coremltools appends ``_palettized``; we strip it).
    """
    out = {}
    for op in _ops(mlmodel, "constexpr_lut_to_dense"):
        name = op.name[: -len("_palettized")] if op.name.endswith("_palettized") else op.name
        out[name] = decode_lut_op(op)
    return out


def decode_lut_op(op) -> np.ndarray:
    """Dense values of a ``constexpr_lut_to_dense`` op of either layout (python_coreml_sd.lut)."""
    if np.asarray(op.lut.val).ndim == 1:  # iOS16: one flat table, indices bit-packed into bytes
        return lut_iOS16(op.indices.val, op.lut.val, op.shape.val)
    axis = getattr(op, "vector_axis", None)
    return lut_iOS18(op.indices.val, op.lut.val, None if axis is None else int(axis.val))


def _ops(mlmodel, op_type):
    for func in mil_program(mlmodel).functions.values():
        yield from _walk(func, op_type)


def _walk(block, op_type):
    for op in block.operations:
        if op.op_type == op_type:
            yield op
        for inner in op.blocks:
            yield from _walk(inner, op_type)
