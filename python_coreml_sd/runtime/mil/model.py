"""MILModel: open an .mlpackage with coremltools' loaders and run its ML Program with PyTorch."""
import contextlib
import os
import warnings
from collections import Counter, OrderedDict, namedtuple
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from ...errors import UserError
from .bounds import bounded_value_inference
from .dtypes import is_float, mil_name, numpy_dtype, storage_dtype
from .ops import BUILDERS
from .ops.registry import STATISTICAL
from .plan import Plan, UnsupportedOpError
from .ops.states import StateCell
from .shapes import allowed_shapes, specialized_spec

# shape: the fixed shape, or for a flexible input the model's default shape; allowed: None for a
# fixed input, else the shapes.AllowedShapes it accepts.
TensorDescription = namedtuple("TensorDescription", "name shape dtype allowed", defaults=(None,))


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


# Op types of the file that coremltools' loader turns into another op.
_LOADED_AS = {"write_state": "coreml_update_state"}


def _check_ops(path, program, function_name):
    """Fail before coremltools' loader does, with the op's name and type."""
    function = program.functions[function_name]
    for block in function.block_specializations.values():
        for op in _walk_ops(block.operations):
            if op.type != "const" and _LOADED_AS.get(op.type, op.type) not in BUILDERS:
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

    return mock.patch.object(InputSpec, "validate_inputs", validate)


@contextlib.contextmanager
def _variadic_dimensions():
    """coremltools' reader, taking a tensor type of unknown rank (the output of `fill` or a
    `random_*` op whose shape input has a run-time length) as PyMIL's variadic shape, as its builder
    does, and matching it with any shape its type inference gives (a specialization fixes the rank)."""
    from coremltools.converters.mil.frontend.milproto import helper
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.program import get_new_variadic_symbol

    dim, compatible = helper.get_proto_dim, types.is_compatible_type

    def variadic(t):
        return types.is_tensor(t) and any(str(d).startswith("*") for d in t.get_shape())

    helper.get_proto_dim = lambda d: get_new_variadic_symbol() if (
        d.WhichOneof("dimension") == "unknown" and d.unknown.variadic) else dim(d)
    types.is_compatible_type = lambda t1, t2: compatible(t1, t2) or (
        variadic(t2) and types.is_tensor(t1) and t1.get_primitive() == t2.get_primitive())
    try:
        yield
    finally:
        helper.get_proto_dim, types.is_compatible_type = dim, compatible


def load_program(path, function_name=None, input_shapes=None, spec=None):
    """(spec, PyMIL Function) of an ML Program package or .mlmodel, checked before it is read.

    input_shapes: {input name: shape} to specialize flexible inputs to (shapes.py); the returned
    spec is the package's own either way. spec: the package's spec when already read.
    """
    from ...package_io import read_program

    path = Path(path)
    spec = _load_spec(path) if spec is None else spec
    name = _function_name(spec, function_name)
    _check_ops(path, spec.mlProgram, name)
    to_load = specialized_spec(spec, name, input_shapes) if input_shapes else spec
    try:
        with bounded_value_inference(), _scalar_epsilon_of_any_float_dtype(), _variadic_dimensions():
            program = read_program(to_load, _weights_dir(path))
    except UserError as e:  # an allocation over the bound
        raise UserError(f"{path}: {e}") from None
    except Exception as e:
        raise UserError(f"{path}: coremltools could not read the ML Program ({type(e).__name__}: {e})") from None
    return spec, program.functions[name]


def _is_state(var):
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _describe_state(var):
    wrapped = var.sym_type.wrapped_type()
    shape = tuple(int(d) for d in wrapped.get_shape())
    return TensorDescription(var.name, shape, np.dtype(numpy_dtype(mil_name(wrapped.get_primitive()))))


class MILState:
    """The states of a stateful model (ct.StateType), as `MILModel.make_state()` makes them: zeros
    at first (as Core ML's), read and updated in place by each `predict(inputs, state=...)`."""

    def __init__(self, description, device):
        self.description = description
        self._values = {n: torch.zeros(d.shape, dtype=_storage_of(d.dtype, device), device=device)
                        for n, d in description.items()}

    def read_state(self, name):
        self._known(name)
        return self._values[name].to("cpu").numpy().astype(self.description[name].dtype)

    def write_state(self, name, value):
        desc = self._known(name)
        value = np.asarray(value)
        if value.shape != desc.shape:
            raise UserError(f"state {name!r} has shape {desc.shape}; got {value.shape}")
        old = self._values[name]
        self._values[name] = torch.from_numpy(np.ascontiguousarray(value.astype(desc.dtype))).to(old.device, old.dtype)

    def _known(self, name):
        if name not in self.description:
            raise UserError(f"unknown state {name!r}; the model's states are {sorted(self.description)}")
        return self.description[name]


def _storage_of(np_dtype, device):
    names = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", np.dtype(np.int32): "int32"}
    return storage_dtype(names[np.dtype(np_dtype)], device)


def _describe(var, allowed=None):
    shape = tuple(int(d) if isinstance(d, (int, np.integer)) else str(d) for d in var.shape)
    if allowed is not None:
        shape = allowed.default
    return TensorDescription(var.name, shape, np.dtype(numpy_dtype(mil_name(var.dtype))), allowed)


def _eager_runner(plan):
    """{input name: tensor} -> output tensors, the plan's steps run one after another."""
    def run(tensors):
        env = list(plan.env_init)
        for name, slot in plan.input_slots.items():
            env[slot] = tensors[name]
        return plan.run(env)
    return run


def _compiled_runner(plan):
    """The plan under torch.compile (Inductor): Dynamo traces the steps' torch closures into one graph
    (the weights become its inputs), so elementwise chains fuse into single kernels. Shapes are fixed
    per specialization (dynamic=False); Inductor's on-disk cache makes a second load cheaper."""
    names, eager = list(plan.input_slots), _eager_runner(plan)
    compiled = torch.compile(lambda *xs: tuple(eager(dict(zip(names, xs)))), dynamic=False)
    return lambda tensors: list(compiled(*[tensors[n] for n in names]))


class _Specialization:
    """The plan compiled for one set of input shapes, its runner, and its CUDA graph once captured."""

    def __init__(self, plan, torch_compile=False):
        self.plan = plan
        self.run = _compiled_runner(plan) if torch_compile else _eager_runner(plan)
        self.graph = None
        self.static_in = self.static_out = None


class MILModel:
    """Runs a Core ML ML Program with PyTorch; `predict` mirrors coremltools.models.MLModel.

    device: "cpu" or "cuda" (or any torch device string). Weights are moved to it once here.
    cuda_graph: on CUDA, capture the whole program in a CUDA graph at the first call and replay it
    (removes the per-op launch overhead; inputs are copied into static buffers).
    fuse: run attention and group-norm op chains as single fused kernels (see fusion.py); default
    on for CUDA, off for CPU, where each fp16 op's result is then rounded exactly as the program says
    (fused on the CPU: fp16 ops computed in fp32, unrounded, as Core ML's CPU compute unit does).
    torch_compile: run each plan through torch.compile (Inductor) instead of op by op: the first call
    compiles (minutes for a full-size UNet, less once Inductor's cache holds its kernels), later calls
    run fused kernels; combines with cuda_graph. Falls back to op by op, with a warning, if it fails.
    Without it, on the CPU, constant convolution and linear weights are laid out for oneDNN at load.
    max_shapes: for inputs with flexible shapes (RangeDim / EnumeratedShapes), how many input-shape
    specializations stay compiled (least recently used dropped; weights are shared between them).
    """

    def __init__(self, path, device="cpu", function_name=None, cuda_graph=False, fuse=None, max_shapes=8,
                 torch_compile=False):
        self.path = str(path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but PyTorch sees no CUDA GPU; use device='cpu'")
        self.spec, function = load_program(path, function_name)
        self._function_name = _function_name(self.spec, function_name)
        self.allowed_shapes = allowed_shapes(self.spec, self._function_name)
        states = {n: v for n, v in function.inputs.items() if _is_state(v)}
        self.state_description = {n: _describe_state(v) for n, v in states.items()}
        self.input_description = {n: _describe(v, self.allowed_shapes.get(n))
                                  for n, v in function.inputs.items() if n not in states}
        self.output_description = {v.name: _describe(v) for v in function.outputs}
        self._input_mil = {n: mil_name(v.dtype) for n, v in function.inputs.items() if n not in states}
        # Op type -> count in the program; the PyMIL function itself is dropped after compiling so
        # its host copies of the weights are freed.
        self.op_types = Counter(op.op_type for op in function.operations)
        self._fuse = self.device.type == "cuda" if fuse is None else bool(fuse)
        self._max_shapes = max(1, int(max_shapes))
        self._shared_constants = {}  # weights on the device, one copy for every specialization
        self._specializations = OrderedDict()
        # A CUDA graph would bake the state tensors' addresses (and a random op's draws) in;
        # stateful models and those with random ops run op by op.
        self._use_graph = (bool(cuda_graph) and self.device.type == "cuda" and not states
                           and not STATISTICAL & set(self.op_types))
        self._torch_compile = bool(torch_compile) and not states  # state cells are not tensors
        key = tuple(d.shape for d in self.input_description.values())
        self._current = None
        if self.allowed_shapes:  # compiled now for the default shape, so a bad op fails at load
            try:
                function = self._load_specialized(dict(zip(self.input_description, key)))
            except UnsupportedOpError:
                raise
            except UserError:
                # The defaults do not fit together (a free batch dimension defaulting to 1 where
                # another input fixes it): coremltools' shape checks refuse it; the first call compiles.
                return
        self._current = self._specializations[key] = self._new_specialization(function)

    def __repr__(self):
        steps = "?" if self._current is None else len(self.plan.steps)
        return f"MILModel({self.path!r}, device={str(self.device)!r}, steps={steps})"

    @property
    def plan(self):
        """The plan of the most recent call (of the default input shapes before any call; None when
        those defaults do not form a valid program)."""
        return None if self._current is None else self._current.plan

    @property
    def _graph(self):
        return None if self._current is None else self._current.graph

    def _compile(self, function):
        try:
            return Plan(function, self.device, fuse=self._fuse, shared_constants=self._shared_constants,
                        prepack=not self._torch_compile)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"{self.path}: {e}") from None
        except UserError as e:  # a folded op over the load-time allocation bound
            raise UserError(f"{self.path}: {e}") from None

    def _new_specialization(self, function):
        return _Specialization(self._compile(function), self._torch_compile)

    def _load_specialized(self, shapes):
        _, function = load_program(self.path, self._function_name, input_shapes=shapes, spec=self.spec)
        return function

    def _specialization(self, tensors):
        key = tuple(tuple(tensors[n].shape) for n in self.input_description)  # states: fixed shapes
        spec = self._specializations.get(key)
        if spec is None:
            spec = self._new_specialization(self._load_specialized(dict(zip(self.input_description, key))))
            self._specializations[key] = spec
            while len(self._specializations) > self._max_shapes:
                self._specializations.popitem(last=False)
        self._specializations.move_to_end(key)
        return spec

    def _check(self, inputs):
        if not isinstance(inputs, dict):
            raise UserError("predict takes a dict {input name: numpy array}")
        expected = self.input_description
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise UserError(f"unknown input(s) {unknown}; the model takes {self._signature()}")
        for name, desc in expected.items():
            if name not in inputs:
                raise UserError(f"missing input {name!r} (shape {self._shape_text(desc)}, dtype {desc.dtype})")
            self._check_one(desc, np.asarray(inputs[name]))

    @staticmethod
    def _shape_text(desc):
        return desc.shape if desc.allowed is None else f"{desc.allowed}, default {desc.shape}"

    def _signature(self):
        return ", ".join(f"{d.name} {self._shape_text(d)} {d.dtype}" for d in self.input_description.values())

    def _check_one(self, desc, arr):
        shape = tuple(arr.shape)
        if desc.allowed is not None and not desc.allowed.allows(shape):
            raise UserError(f"input {desc.name!r} has shape {shape}; the model allows {desc.allowed} ({desc.dtype})")
        if desc.allowed is None and shape != desc.shape:
            raise UserError(f"input {desc.name!r} has shape {shape}; expected {desc.shape} ({desc.dtype})")
        want_float = is_float(self._input_mil[desc.name])
        ok = arr.dtype.kind in ("f", "i", "u", "b") if want_float else arr.dtype.kind in ("i", "u", "b")
        if not ok:
            raise UserError(f"input {desc.name!r} has dtype {arr.dtype}; expected {desc.dtype} (shape {self._shape_text(desc)})")

    def _to_device(self, name, arr):
        mil = self._input_mil[name]
        arr = np.ascontiguousarray(np.asarray(arr).astype(numpy_dtype(mil), copy=False))
        return torch.from_numpy(arr).to(self.device, storage_dtype(mil, self.device))

    def make_state(self):
        """A fresh MILState (zeros) for a stateful model, to pass to predict(inputs, state=...)."""
        if not self.state_description:
            raise UserError(f"{self.path}: the model has no state inputs; predict takes no state")
        return MILState(self.state_description, self.device)

    def _state_cells(self, state):
        if not self.state_description:
            if state is not None:
                raise UserError(f"{self.path}: the model has no state inputs; predict takes no state")
            return {}
        if not isinstance(state, MILState) or set(state.description) != set(self.state_description):
            raise UserError(f"{self.path}: the model is stateful (states {sorted(self.state_description)}); "
                            "pass state=model.make_state()")
        return {n: StateCell(state._values[n]) for n in self.state_description}

    def predict(self, inputs, state=None):
        self._check(inputs)
        with torch.inference_mode():
            tensors = {n: self._to_device(n, a) for n, a in inputs.items()}
            outs = self._execute(tensors, state)
            return {name: t.detach().to("cpu").numpy().astype(self.output_description[name].dtype, copy=False)
                    for name, t in outs.items()}

    def predict_tensors(self, tensors: dict, state=None) -> dict:
        """predict on torch tensors, ideally already on the model's device in the dtypes the runtime stores
        inputs in (dtypes.storage_dtype; then nothing is copied): a loop of calls (UNet steps) keeps its values
        on the GPU. Returns {output name: tensor on the device}."""
        self._check({n: np.empty(tuple(t.shape), np.float32 if t.is_floating_point() else np.int32)
                     for n, t in tensors.items()})  # shapes and kinds only: empty arrays cost no copy
        with torch.inference_mode():
            return self._execute({n: t.to(self.device, storage_dtype(self._input_mil[n], self.device))
                                  for n, t in tensors.items()}, state)

    def _execute(self, tensors, state):
        cells = self._state_cells(state)
        spec = self._current = self._specialization(tensors) if self.allowed_shapes else self._current
        tensors.update(cells)
        outs = self._run_graph(spec, tensors) if self._use_graph else self._run_spec(spec, tensors)
        for n, cell in cells.items():  # the state keeps what the program wrote
            state._values[n] = cell.value
        return dict(zip(spec.plan.output_names, outs))

    def _run_spec(self, spec, tensors):
        """spec.run, or (once a compiled runner failed) the steps op by op from then on."""
        try:
            return spec.run(tensors)
        except Exception as e:
            if not self._torch_compile:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running op by op")
            self._torch_compile = False
            for other in self._specializations.values():
                other.run = _eager_runner(other.plan)
            return spec.run(tensors)

    def _run_graph(self, spec, tensors):
        if spec.graph is None:
            try:
                self._capture(spec, tensors)
            except Exception as e:  # an op that cannot be captured: keep running eagerly
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running op by op")
                self._use_graph, spec.graph = False, None
                return self._run_spec(spec, tensors)
        for name, t in tensors.items():
            spec.static_in[name].copy_(t)
        spec.graph.replay()
        return [t.clone() for t in spec.static_out]

    def _capture(self, spec, tensors):
        spec.static_in = {n: t.clone() for n, t in tensors.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy cuBLAS/cuDNN init must not be captured
            for _ in range(2):  # and torch.compile's compilation
                self._run_spec(spec, spec.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        spec.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(spec.graph):
            spec.static_out = spec.run(spec.static_in)
