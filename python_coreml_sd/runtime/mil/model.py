"""MILModel: open an .mlpackage with coremltools' loaders and run its ML Program with PyTorch."""
import contextlib
import os
import warnings
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError
from .bounds import bounded_value_inference
from .dtypes import is_float, mil_name, numpy_dtype, storage_dtype
from .ops import BUILDERS
from .plan import Plan, UnsupportedOpError

TensorDescription = namedtuple("TensorDescription", "name shape dtype")


def supported_ops():
    return sorted(BUILDERS) + ["const"]


def _load_spec(path: Path):
    from ...package_check import load_spec

    spec = load_spec(path)  # refuses packages whose files lie outside them
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise UserError(
            f"{path}: holds a Core ML '{kind}' model, not an ML Program; the MIL runtime runs "
            "ML Programs only (convert with convert_to='mlprogram')"
        )
    return spec


def _weights_dir(path: Path) -> str:
    if not path.is_dir():
        return str(path.parent / "weights")
    from coremltools.models.utils import _ModelPackage
    # The root model's path comes from Manifest.json, which _load_spec checked stays in the package.

    root = _ModelPackage(str(path)).getRootModel().path()
    return os.path.join(os.path.dirname(root), "weights")


def _walk_ops(operations):
    for op in operations:
        yield op
        for block in op.blocks:
            yield from _walk_ops(block.operations)


def _check_ops(path, program, function_name):
    """Fail before coremltools' loader does, with the op's name and type."""
    function = program.functions[function_name]
    for block in function.block_specializations.values():
        for op in _walk_ops(block.operations):
            if op.type != "const" and op.type not in BUILDERS:
                name = op.outputs[0].name if op.outputs else "?"
                raise UnsupportedOpError(
                    f"{path}: op {name!r} of type {op.type!r} is not supported by the MIL runtime"
                )


def _function_name(spec, function_name):
    names = list(spec.mlProgram.functions)
    name = function_name or spec.description.defaultFunctionName or "main"
    if name not in names:
        raise UserError(f"function {name!r} not in the program; it has {names}")
    return name


# Ops whose `epsilon` shares a type domain with their parameters. coremltools' builder writes a
# default epsilon as fp32 even where the parameters are fp16 (iOS17 batch_norm with fp16 mean and
# variance); Core ML runs such programs, but coremltools' reader rejects them when it validates.
_EPSILON_OPS = frozenset(("batch_norm", "instance_norm", "layer_norm"))


@contextlib.contextmanager
def _scalar_epsilon_of_any_float_dtype():
    """coremltools' reader, accepting a scalar const `epsilon` whose float dtype differs from the
    parameters' (its value is read as a Python float, so the dtype changes nothing here)."""
    from coremltools.converters.mil.mil.input_type import InputSpec

    original = InputSpec.validate_inputs

    def validate(self, op_name, op_type, candidate_kvs):
        eps = candidate_kvs.get("epsilon") if op_type in _EPSILON_OPS else None
        if eps is not None and eps.val is not None and np.ndim(eps.val) == 0:
            rest = {k: v for k, v in candidate_kvs.items() if k != "epsilon"}
            original(self, op_name, op_type, rest)
            return original(self, op_name, op_type, {"epsilon": eps})
        return original(self, op_name, op_type, candidate_kvs)

    InputSpec.validate_inputs = validate
    try:
        yield
    finally:
        InputSpec.validate_inputs = original


def load_program(path, function_name=None):
    """(spec, PyMIL Function) of an ML Program package or .mlmodel, checked before it is read."""
    from ...package_io import read_program

    path = Path(path)
    spec = _load_spec(path)
    name = _function_name(spec, function_name)
    _check_ops(path, spec.mlProgram, name)
    try:
        with bounded_value_inference(), _scalar_epsilon_of_any_float_dtype():
            program = read_program(spec, _weights_dir(path))
    except UserError as e:  # an allocation over the bound
        raise UserError(f"{path}: {e}") from None
    except Exception as e:
        raise UserError(f"{path}: coremltools could not read the ML Program ({type(e).__name__}: {e})") from None
    return spec, program.functions[name]


def _describe(var):
    shape = tuple(int(d) if isinstance(d, (int, np.integer)) else str(d) for d in var.shape)
    return TensorDescription(var.name, shape, np.dtype(numpy_dtype(mil_name(var.dtype))))


class MILModel:
    """Runs a Core ML ML Program with PyTorch; `predict` mirrors coremltools.models.MLModel.

    device: "cpu" or "cuda" (or any torch device string). Weights are moved to it once here.
    cuda_graph: on CUDA, capture the whole program in a CUDA graph at the first call and replay it
    (removes the per-op launch overhead; inputs are copied into static buffers).
    fuse: run attention and group-norm op chains as single fused kernels (see fusion.py); default
    on for CUDA, off for CPU, where each fp16 op's result is rounded exactly as the program says.
    """

    def __init__(self, path, device="cpu", function_name=None, cuda_graph=False, fuse=None):
        self.path = str(path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but PyTorch sees no CUDA GPU; use device='cpu'")
        self.spec, function = load_program(path, function_name)
        self.input_description = {n: _describe(v) for n, v in function.inputs.items()}
        self.output_description = {v.name: _describe(v) for v in function.outputs}
        for desc in self.input_description.values():
            if not all(isinstance(d, int) for d in desc.shape):
                raise UserError(f"{path}: input {desc.name!r} has a flexible shape {desc.shape}; the MIL runtime needs fixed shapes")
        self._input_mil = {n: mil_name(v.dtype) for n, v in function.inputs.items()}
        # Op type -> count in the program; the PyMIL function itself is dropped after compiling so
        # its host copies of the weights are freed.
        self.op_types = Counter(op.op_type for op in function.operations)
        try:
            fuse = self.device.type == "cuda" if fuse is None else bool(fuse)
            self.plan = Plan(function, self.device, fuse=fuse)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"{path}: {e}") from None
        except UserError as e:  # a folded op over the load-time allocation bound
            raise UserError(f"{path}: {e}") from None
        self._graph = None
        self._use_graph = bool(cuda_graph) and self.device.type == "cuda"

    def __repr__(self):
        return f"MILModel({self.path!r}, device={str(self.device)!r}, steps={len(self.plan.steps)})"

    def _check(self, inputs):
        if not isinstance(inputs, dict):
            raise UserError("predict takes a dict {input name: numpy array}")
        expected = self.input_description
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise UserError(f"unknown input(s) {unknown}; the model takes {self._signature()}")
        for name, desc in expected.items():
            if name not in inputs:
                raise UserError(f"missing input {name!r} (shape {desc.shape}, dtype {desc.dtype})")
            self._check_one(desc, np.asarray(inputs[name]))

    def _signature(self):
        return ", ".join(f"{d.name} {d.shape} {d.dtype}" for d in self.input_description.values())

    def _check_one(self, desc, arr):
        if tuple(arr.shape) != desc.shape:
            raise UserError(f"input {desc.name!r} has shape {tuple(arr.shape)}; expected {desc.shape} ({desc.dtype})")
        want_float = is_float(self._input_mil[desc.name])
        ok = arr.dtype.kind in ("f", "i", "u", "b") if want_float else arr.dtype.kind in ("i", "u", "b")
        if not ok:
            raise UserError(f"input {desc.name!r} has dtype {arr.dtype}; expected {desc.dtype} (shape {desc.shape})")

    def _to_device(self, name, arr):
        mil = self._input_mil[name]
        arr = np.ascontiguousarray(np.asarray(arr).astype(numpy_dtype(mil), copy=False))
        return torch.from_numpy(arr).to(self.device, storage_dtype(mil, self.device))

    def predict(self, inputs):
        self._check(inputs)
        with torch.inference_mode():
            tensors = {n: self._to_device(n, a) for n, a in inputs.items()}
            outs = self._run_graph(tensors) if self._use_graph else self._run(tensors)
            return {
                name: t.detach().to("cpu").numpy().astype(numpy_dtype(mil), copy=False)
                for name, t, mil in zip(self.plan.output_names, outs, self.plan.output_mil_dtypes)
            }

    def _run(self, tensors):
        env = list(self.plan.env_init)
        for name, slot in self.plan.input_slots.items():
            env[slot] = tensors[name]
        return self.plan.run(env)

    def _run_graph(self, tensors):
        if self._graph is None:
            try:
                self._capture(tensors)
            except Exception as e:  # an op that cannot be captured: keep running eagerly
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running op by op")
                self._use_graph, self._graph = False, None
                return self._run(tensors)
        for name, t in tensors.items():
            self._static_in[name].copy_(t)
        self._graph.replay()
        return [t.clone() for t in self._static_out]

    def _capture(self, tensors):
        self._static_in = {n: t.clone() for n, t in tensors.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy cuBLAS/cuDNN init must not be captured
            for _ in range(2):
                self._run(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._run(self._static_in)
