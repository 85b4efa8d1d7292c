"""Per-layer sensitivity to palettization, measured in batches.

What is measured: for each layer and bit width, the output PSNR of the module with only that layer's
weight replaced by its palettized values (fp16, snapped to the look-up table our palettizer writes)
against the untouched fp32 module, on one set of sample inputs. How it is made fast:

- **Each layer clustered once per bit width.** One fp16 histogram per layer; per bit width the
  stored LUT and the label of each distinct value (``Palette``), kept and reused by every later
  measurement (the chosen recipe, the trade-off curve). The dense weight is one gather away.
- **The reference output is computed once.**
- **Batches of candidates.** ``Probe.measure`` runs up to ``batch`` candidates (recipes) in one
  forward pass: the inputs repeated along the batch, and a forward hook on each layer a candidate
  palettizes recomputes that layer's output for those batch entries with the palettized weight.
  Batch entries do not interact in the models this is for (convolutions, group norm and attention
  work per sample), so each entry is its own candidate's forward pass, up to float rounding.
- **CPU: worker processes, one thread each.** Forked workers take groups of layers, cluster and
  score them. Small layers make intra-op threads wait on each other at every op: on the shared
  2-core machine one batch-1 forward pass of ``tiny`` took 2.1 s with torch's 2 threads, 66 ms with
  one.
- **CUDA:** the clustering runs in forked workers first (numpy only, before CUDA is touched), then
  the batches run on the GPU in fp32, TF32 off (its 10-bit mantissa would swamp 8-bit effects).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from python_coreml_sd.compression.kmeans import Histogram, kmeans_sorted, stored_lut
from python_coreml_sd.compression.palettize import WEIGHT_THRESHOLD, worker_count
from python_coreml_sd.compression.recipes import KEEP_FP16
from python_coreml_sd.errors import UserError
from python_coreml_sd.metrics import psnr

LAYER_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)


def palettizable_layers(module, threshold: int = WEIGHT_THRESHOLD) -> dict:
    """{module path: layer} for conv/linear layers whose weight coremltools would palettize."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, LAYER_TYPES) and m.weight.numel() > threshold}


class Palette:
    """A layer's weight as sorted distinct fp16 values with counts, and at each bit width the value
    each one becomes: exactly ``palettize_array``'s LUT and indices, without the per-element pass.
    Small (at most 65,536 values), so workers send palettes back."""

    def __init__(self, weight: torch.Tensor, bits=()):
        hist = Histogram(weight.detach().to(torch.float16).cpu().numpy())
        self.codes, self._values, self._counts = hist.distinct_codes, hist.values, hist.counts
        self._palettized = {}
        for b in bits:
            self.values(b)

    def values(self, bits: int) -> np.ndarray:
        """What each distinct value becomes at ``bits`` (float32), clustered on first use."""
        if bits not in self._palettized:
            centroids = kmeans_sorted(self._values, self._counts, 1 << bits)
            lut, labels = stored_lut(self._values, centroids, np.float16)
            self._palettized[bits] = (lut.astype(np.float32), labels)  # small to send: uint8 labels
        lut, labels = self._palettized[bits]
        return lut[labels]

    def dense(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """The palettized weight (float32, on the weight's device)."""
        table = np.zeros(1 << 16, dtype=np.float32)
        table[self.codes] = self.values(bits)
        codes = weight.detach().to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        return torch.from_numpy(table).to(weight.device)[codes]


class Probe:
    """A module, its batch-1 sample inputs and its palettizable layers (by name), with the untouched
    output computed once and each layer's ``Palette`` made once."""

    def __init__(self, module, inputs: dict, layers: dict, bits, batch: int = 16):
        self.module, self.layers, self.bits, self.batch = module.eval(), layers, tuple(bits), batch
        self.inputs = list(inputs.values())
        if any(v.shape[:1] != (1,) for v in self.inputs):
            raise ValueError("the sensitivity analysis takes batch-1 sample inputs")
        self.palettes: dict = {}
        self._reference = None

    @property
    def reference(self) -> np.ndarray:
        if self._reference is None:
            self._reference = self._forward(1).cpu().numpy()
        return self._reference

    def to(self, device) -> "Probe":
        self.module.to(device)
        self.inputs = [v.to(device) for v in self.inputs]
        self._reference = None
        return self

    def palette(self, name: str) -> Palette:
        if name not in self.palettes:
            self.palettes[name] = Palette(self.layers[name].weight, self.bits)
        return self.palettes[name]

    def measure(self, recipes: list) -> list:
        """Output PSNR of each recipe ({layer: bits}, 16 = untouched) against the untouched module;
        +inf, as before, for a recipe that palettizes nothing."""
        scores = [float("inf")] * len(recipes)
        active = [i for i, recipe in enumerate(recipes) if set(recipe.values()) - {KEEP_FP16}]
        for start in range(0, len(active), self.batch):
            rows = active[start:start + self.batch]
            for i, out in zip(rows, self._run([recipes[i] for i in rows])):
                scores[i] = psnr(self.reference, out[None])
        return scores

    def sensitivity(self, names) -> dict:
        """{layer: {bits: PSNR with only that layer palettized}}."""
        scores = iter(self.measure([{n: b} for n in names for b in self.bits]))
        return {n: {b: next(scores) for b in self.bits} for n in names}

    def _run(self, recipes: list) -> np.ndarray:
        groups = {}
        for i, recipe in enumerate(recipes):
            for name, bits in recipe.items():
                if bits != KEEP_FP16:
                    groups.setdefault(name, {}).setdefault(bits, []).append(i)
        hooks = [self.layers[n].register_forward_hook(self._hook(n, g, len(recipes))) for n, g in groups.items()]
        try:
            return self._forward(len(recipes)).cpu().numpy()
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, name: str, groups: dict, batch: int):
        palette = self.palette(name)

        def hook(layer, args, output):
            x = args[0]
            if x.shape[0] != batch or output.shape[0] != batch:
                raise RuntimeError(f"{name}: batch entries are not on the first axis; cannot measure in batches")
            for bits, rows in groups.items():
                index = torch.tensor(rows, device=x.device)
                output[index] = _layer_forward(layer, x[index], palette.dense(layer.weight, bits))
            return output

        return hook

    def _forward(self, n: int) -> torch.Tensor:
        with torch.no_grad(), _exact_cuda_math():
            return self.module(*(v.expand(n, *v.shape[1:]) for v in self.inputs)).float()


def _layer_forward(layer, x, weight):
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


@contextlib.contextmanager
def _exact_cuda_math():
    """fp32 matmuls and convolutions on CUDA without TF32 (cuDNN allows it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for a user's "auto" / "cpu" / "cuda"."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def analyse(probe: Probe, device: str = "cpu", workers: int | None = None, log=print,
            score_in_workers: bool | None = None) -> dict:
    """{layer: {bits: PSNR}} for every layer of the probe, in the probe's layer order.

    The probe's module must be on the CPU. CPU: workers cluster and score groups of layers (the
    default, ``score_in_workers``); otherwise (CUDA) they only cluster, then the probe moves to
    ``device`` and scores everything here.
    """
    workers = worker_count() if workers is None else workers
    names = list(probe.layers)
    groups = _groups(names, max(1, probe.batch // max(1, len(probe.bits))))
    scores = {}
    if score_in_workers if score_in_workers is not None else device == "cpu":
        for _, (group_scores, palettes) in _in_workers(probe, _sensitivity_task, groups, workers):
            probe.palettes.update(palettes)
            scores.update(_logged(group_scores, log, offset=len(scores)))
        return scores
    start = time.perf_counter()
    for _, palettes in _in_workers(probe, _palettes_task, [[n] for n in names], workers):
        probe.palettes.update(palettes)
    if log:
        log(f"clustered {len(names)} layers x {len(probe.bits)} bit widths in {time.perf_counter() - start:.1f} s "
            f"({workers} worker processes)")
    probe.to(device)
    for group in groups:
        scores.update(_logged(probe.sensitivity(group), log, offset=len(scores)))
    return scores


def _groups(names: list, size: int) -> list:
    return [names[i:i + size] for i in range(0, len(names), size)]


def _logged(scores: dict, log, offset: int = 0) -> dict:
    if log:
        for i, (name, by_bits) in enumerate(scores.items(), offset + 1):
            log(f"[{i}] {name}: " + ", ".join(f"{b}b {s:.1f}" for b, s in by_bits.items()))
    return scores


_PROBE = None  # the probe forked workers read


def _sensitivity_task(names):
    return _PROBE.sensitivity(names), {n: _PROBE.palette(n) for n in names}


def _palettes_task(names):
    return {n: _PROBE.palette(n) for n in names}


def _in_workers(probe: Probe, task, groups: list, workers: int):
    """(group, task(group)) for each group, in order: in forked workers (one torch thread each) when
    there are several cores and fork exists, else in this process."""
    global _PROBE
    _PROBE = probe
    try:
        if workers < 2 or len(groups) < 2 or "fork" not in multiprocessing.get_all_start_methods():
            yield from ((g, task(g)) for g in groups)
            return
        if task is _sensitivity_task:
            probe.reference  # noqa: B018 (computed once, before forking, for every worker)
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(groups)), mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            yield from zip(groups, pool.map(task, groups))
    finally:
        _PROBE = None
