"""The PyTorch side of the runtime benchmarks: what a user would run instead of our MIL runtime.

Eager diffusers modules, the same captured in a CUDA graph, torch.compile (default mode), and
torch.compile captured in a CUDA graph; plus one timer for every row (CUDA events on a GPU,
perf_counter on the CPU; median of N calls after warm-up, optionally in interleaved rounds).
Imported by bench_runtime_unet.py and bench_pipeline.py (this folder is on sys.path when they run).
"""
import statistics
import time

import numpy as np
import torch


def time_once(fn, device: str) -> float:
    """Milliseconds of one fn() call. On CUDA the call sits between two events on the current stream,
    recorded after a synchronize, so the time includes any gaps in which the GPU waits for the host
    (launch overhead) and, for calls that copy to and from the host, those copies."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(iters))


def interleaved_median_ms(fns: list, device: str, warmup: int, iters: int) -> list:
    """Median milliseconds of each fn, timed in `iters` rounds that call every fn once, in order: a
    change of machine load or clock during the run then touches every row alike, not whichever row
    happened to be running. `warmup` calls of each fn first."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            ts.append(time_once(fn, device))
    return [statistics.median(ts) for ts in times]


def cuda_graphed(fn, static_inputs, warmup: int = 3):
    """Capture fn(*static_inputs) in a CUDA graph. Returns (replay, static_output): replay() re-runs the
    captured kernels on whatever static_inputs hold now (copy new values into them first) and returns
    static_output, which the next replay overwrites.

    The warm-up calls run on a side stream first, so that lazy initialisation (cuBLAS/cuDNN handles,
    torch.compile's compilation and autotuning) happens outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)

    def replay():
        graph.replay()
        return out

    return replay, out


def compiled(module):
    """torch.compile with its defaults (mode="default", inductor), as a user would first try it."""
    return torch.compile(module)


class FastTorchModel:
    """A generation.components.TorchModel (numpy in, numpy out) whose module runs through
    torch.compile and/or a CUDA graph; same predict() signature and conversions as TorchModel.

    The graph is captured at the first predict() (after torch.compile's compilation, which happens in
    its warm-up calls); later calls copy the inputs into the captured static buffers and replay."""

    def __init__(self, torch_model, compile_module=True, cuda_graph=True):
        self.base = torch_model
        self.fn = compiled(torch_model.module) if compile_module else torch_model.module
        self.cuda_graph = cuda_graph and torch.device(torch_model.device).type == "cuda"
        self._replay = self._static = None

    @property
    def input_names(self):
        return self.base.input_names

    @torch.inference_mode()
    def predict(self, inputs: dict) -> dict:
        args = [self.base._tensor(name, inputs[name]) for name in self.base.input_names]
        if not self.cuda_graph:
            outputs = self.fn(*args)
        else:
            if self._replay is None:
                self._static = [a.clone() for a in args]
                self._replay, _ = cuda_graphed(self.fn, self._static)
            for static, a in zip(self._static, args):
                static.copy_(a)
            outputs = self._replay()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.base.output_names, outputs)}


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()
