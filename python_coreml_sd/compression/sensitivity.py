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
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from python_coreml_sd.compression.kmeans import Histogram, kmeans_sorted, stored_lut
from python_coreml_sd.compression.palettize import WEIGHT_THRESHOLD, worker_count
from python_coreml_sd.compression.recipes import KEEP_FP16
from python_coreml_sd.errors import UserError, first_line
from python_coreml_sd.metrics import psnr
from python_coreml_sd.package_io import replace_atomically

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


def analyse(probe: Probe, device: str = "cpu", workers: int | None = None, log=print,
            score_in_workers: bool | None = None, max_memory: int | None = None,
            score_file: Path | None = None) -> dict:
    """{layer: {bits: PSNR}} for every layer of the probe, in the probe's layer order.

    The probe's module must be on the CPU. CPU: workers cluster and score groups of layers (the
    default, ``score_in_workers``); otherwise (CUDA) they only cluster, then the probe moves to
    ``device`` and scores everything here. CPU scoring first trims the batch, then workers, to what
    ``fit_memory`` says fits ``max_memory`` bytes (default: the memory this machine has available).
    With ``score_file`` (``ScoreFile``), layers scored there before are read, not measured, and each
    group's scores are added to it as they come.
    """
    workers = worker_count() if workers is None else workers
    names = list(probe.layers)
    in_workers = score_in_workers if score_in_workers is not None else device == "cpu"
    if in_workers:
        workers, probe.batch = fit_memory(probe, workers, max_memory, log)
    else:
        _cluster(probe, names, workers, log)
        probe.to(device)
    saved = ScoreFile(score_file, probe.reference) if score_file is not None else None
    scores = saved.known(names, probe.bits) if saved else {}
    if scores and log:
        log(f"{len(scores)} of {len(names)} layers' scores read from {score_file}")
    groups = _groups([n for n in names if n not in scores], max(1, probe.batch // max(1, len(probe.bits))))
    if in_workers:
        results = (result for _, result in _in_workers(probe, _sensitivity_task, groups, workers))
    else:
        results = ((probe.sensitivity(group), {}) for group in groups)
    for group_scores, palettes in results:
        probe.palettes.update(palettes)
        scores.update(_logged(group_scores, log, offset=len(scores)))
        if saved:
            saved.add(group_scores)
    unclustered = [n for n in names if n not in probe.palettes]
    if in_workers and unclustered:  # layers whose scores were read: the recipes still need their palettes
        _cluster(probe, unclustered, workers, log)
    return {n: scores[n] for n in names}


def _cluster(probe: Probe, names: list, workers: int, log) -> None:
    start = time.perf_counter()
    for _, palettes in _in_workers(probe, _palettes_task, [[n] for n in names], workers):
        probe.palettes.update(palettes)
    if log:
        log(f"clustered {len(names)} layers x {len(probe.bits)} bit widths in {time.perf_counter() - start:.1f} s "
            f"({workers} worker processes)")


class ScoreFile:
    """Per-layer scores kept in a JSON file as they are measured, so that an interrupted analysis, or
    another recipe of the same model, measures no layer twice. The file knows its model by a sample of
    the untouched output on the sample inputs: within float rounding (a CPU run resumes on CUDA), and far
    outside it for other weights or inputs, which are refused. A layer counts as scored when the file has
    every bit width asked for."""

    SAMPLE = 4096

    def __init__(self, path: Path, reference: np.ndarray):
        self.path = Path(path)
        flat = reference.reshape(-1).astype(np.float64)
        self.sample = flat[::max(1, flat.size // self.SAMPLE)][:self.SAMPLE]
        self.layers = {}
        if self.path.exists():
            sample, self.layers = self.read(self.path)
            peak = np.abs(self.sample).max()
            if sample.shape != self.sample.shape or np.abs(sample - self.sample).max() > 1e-3 * peak:
                raise UserError(f"{self.path} holds the scores of another model or other sample inputs; "
                                "give another path or delete it")

    @staticmethod
    def read(path: Path) -> tuple:
        """(reference sample, {layer: {bits: PSNR}}) of a scores file, or a UserError naming it."""
        try:
            doc = json.loads(Path(path).read_text())
            layers = {str(n): {str(b): float(v) for b, v in by_bits.items()} for n, by_bits in doc["layers"].items()}
            return np.asarray(doc["reference_sample"], dtype=np.float64), layers
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{path} is not a scores file of this analysis ({first_line(exc)}); "
                            "give another path or delete it")

    def known(self, names, bits) -> dict:
        """{layer: {bits: PSNR}} for the layers of ``names`` scored at every width of ``bits``."""
        found = {}
        for name in names:
            by_bits = self.layers.get(name, {})
            if all(str(b) in by_bits for b in bits):
                found[name] = {b: by_bits[str(b)] for b in bits}
        return found

    def add(self, scores: dict) -> None:
        for name, by_bits in scores.items():
            self.layers.setdefault(name, {}).update({str(b): float(s) for b, s in by_bits.items()})
        doc = {"reference_sample": self.sample.tolist(), "layers": self.layers}
        replace_atomically(lambda tmp: tmp.write_text(json.dumps(doc)), self.path, overwrite=True)


def fit_memory(probe: Probe, workers: int, max_memory: int | None = None, log=print) -> tuple:
    """(workers, batch), at most the requested ones, whose estimated peak fits in ``max_memory`` bytes of
    RSS (default: this process's RSS plus the memory Linux calls available): smaller batches first, as
    every worker keeps a core busy, then fewer workers.

    Measured, not guessed from the architecture: the peak RSS of the batch-1 reference forward pass
    over the RSS before it is one batch entry's activations; each worker adds ``batch`` of those and
    the largest layer's transient dense weight (int64 codes twice, fp32 values); forked workers share
    the weights. Without Linux's /proc (peak RSS cannot be reset) the request stands.
    """
    before = _rss_bytes(reset_peak=True)
    probe.reference  # noqa: B018 (computed once, here, to measure it)
    peak = _rss_bytes(peak=True)
    if before is None or peak is None:
        return workers, probe.batch
    limit = max_memory if max_memory is not None else before + _available_bytes()
    entry = max(peak - before, 1)
    largest = max(layer.weight.numel() for layer in probe.layers.values())
    palettes = sum(min(layer.weight.numel(), 1 << 16) for layer in probe.layers.values()) * (26 + len(probe.bits))

    def need(w: int, b: int) -> int:
        return peak + palettes + w * (b * entry + 20 * largest)

    plans = [(w, b) for w in range(workers, 0, -1) for b in _halvings(probe.batch, len(probe.bits))]
    fitting = next(((w, b) for w, b in plans if need(w, b) <= limit), None)
    if fitting is None:
        raise UserError(f"the pre-analysis needs about {_gb(need(*plans[-1]))} GB even with one worker at batch "
                        f"{plans[-1][1]}; {_gb(limit)} GB is available: free memory, or run it with --device cuda")
    if fitting != (workers, probe.batch) and log:
        log(f"memory: {workers} workers at batch {probe.batch} need about {_gb(need(workers, probe.batch))} GB of "
            f"{_gb(limit)} GB; using {fitting[0]} at batch {fitting[1]} (about {_gb(need(*fitting))} GB)")
    return fitting


def _halvings(batch: int, smallest: int) -> list:
    sizes = [batch]
    while sizes[-1] // 2 >= max(1, smallest):
        sizes.append(sizes[-1] // 2)
    return sizes


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def _rss_bytes(peak: bool = False, reset_peak: bool = False) -> int | None:
    """This process's RSS (or its peak, VmHWM) from /proc; None where there is no /proc."""
    try:
        if reset_peak:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmHWM" if peak else "VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _available_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["MemAvailable"].split()[0]) * 1024


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
