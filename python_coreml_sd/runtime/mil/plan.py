"""Compile a PyMIL function into a flat execution plan.

Every runtime value lives in a slot of a list (`env`). A step is `(fn, input_slots, output_slot(s),
slots_to_free)`; constants sit pre-filled in `env` on the device. Ops whose inputs are all constant
(constexpr decompression, shape arithmetic) are evaluated once here and become constants, so the
hot loop only runs ops that depend on the model inputs. Slots are released right after their last
reader so peak memory stays close to what the live activations need.
"""
import numpy as np
import torch
from coremltools.converters.mil.mil import types

from ...errors import UserError
from .bounds import check_load_size
from .dtypes import mil_name, storage_dtype
from .fusion import find_fusions
from .ops import BUILDERS, NotConstant, OpArgs
from .ops.registry import STATISTICAL, Derived

# Ops whose fp16 output equals an fp16 input element (or a copy), so CPU fp32 compute needs no
# rounding back to fp16.
EXACT_OPS = frozenset(
    "reshape transpose expand_dims squeeze flatten2d reshape_like slice_by_index slice_by_size "
    "concat split stack tile pad gather gather_along_axis gather_nd identity reverse crop relu "
    "maximum minimum reduce_max reduce_min select upsample_nearest_neighbor "
    "resize_nearest_neighbor depth_to_space pixel_shuffle space_to_depth pixel_unshuffle abs "
    "sign threshold cond while_loop list_read list_gather read_state coreml_update_state".split()
)


class UnsupportedOpError(UserError):
    """The program holds an op this runtime cannot execute."""


# Constants at least this large are shared between the plans of one model's input-shape
# specializations (its weights); smaller ones include values the loader itself names.
_SHARED_MIN_ELEMENTS = 1024


def _shared_key(var):
    """Key of a weight shared by the specializations of one program: its name, shape and dtype
    (weights do not depend on input shapes; shape-dependent values are small or not constexpr)."""
    if not all(isinstance(d, (int, np.integer)) for d in var.shape):
        return None
    if int(np.prod(var.shape)) < _SHARED_MIN_ELEMENTS:
        return None
    return var.name, tuple(int(d) for d in var.shape), str(var.dtype)


class _Slots:
    """parent: the slots of the enclosing scope, for a nested block (cond / while_loop): the
    block reads the enclosing scope's constants as its own, and its other values as captures."""

    def __init__(self, device, shared=None, parent=None, prepack=False):
        self.device = device
        self.prepack = prepack  # builders may lay constant weights out for oneDNN (ops/onednn.py)
        self.index = {}
        self.env = []
        self.constant = set()
        self.values = {}  # id(var) -> constant tensor (folded or const op)
        self.shared = {} if shared is None else shared
        self.parent = parent
        self.captures = []  # vars of enclosing scopes the block reads, in slot order
        self.derived = []  # the Derived constants whose ids key `values` and `index`
        self.created = []  # keys of the shared constants made by these slots

    def runtime(self, var):
        key = id(var)
        if key not in self.index:
            self.index[key] = len(self.env)
            self.env.append(None)
        return self.index[key]

    def is_constant(self, var):
        if isinstance(var, Derived) or id(var) in self.values or (var.op is not None and var.op.op_type == "const"):
            return True
        return self.parent is not None and self.parent.is_constant(var)

    def constant_tensor(self, var):
        if isinstance(var, Derived):
            return self._derived(var)
        key = id(var)
        if key not in self.values and self.parent is not None and self.parent.is_constant(var):
            self.values[key] = self.parent.constant_tensor(var)
        if key not in self.values:
            shared = _shared_key(var)
            if shared is not None and shared in self.shared:
                self.values[key] = self.shared[shared]
            else:
                self.values[key] = _const_to_tensor(var, self.device)
                if shared is not None:
                    self.share(shared, self.values[key])
        return self.values[key]

    def _derived(self, d):
        """A fusion's or a builder's constant made once from constants (merged or prepacked weights),
        shared like weights when its sources are; they are read without being kept, so only the derived
        copy stays on the device. `d` is kept alive with the slots: they are keyed by id."""
        if id(d) not in self.values:
            self.derived.append(d)
            keys = tuple(_shared_key(v) for v in d.vars)
            key = None if None in keys else ("derived", d.tag) + keys
            value = self.shared.get(key)
            if value is None:
                sources = [self.values.get(id(v)) for v in d.vars]
                value = d.fn(*[_const_to_tensor(v, self.device) if t is None else t for v, t in zip(d.vars, sources)])
                if key is not None:
                    self.share(key, value)
            self.values[id(d)] = value
        return self.values[id(d)]

    def share(self, key, value):
        self.shared[key] = value
        self.created.append(key)

    def prune_shared(self):
        """Drops the shared constants made here that no step reads (a palettized weight's indices and
        decompressed values once a prepacked or merged copy replaced them): the model would otherwise
        hold them for its lifetime. Another specialization that needs one makes it again."""
        read = {id(t) for t in self.env if t is not None}
        for key in self.created:
            if key in self.shared and id(self.shared[key]) not in read:
                del self.shared[key]

    def slot(self, var):
        if self.is_constant(var):
            key = id(var)
            if key not in self.index:
                self.index[key] = len(self.env)
                self.env.append(self.constant_tensor(var))
                self.constant.add(self.index[key])
            return self.index[key]
        if self.parent is not None and id(var) not in self.index:
            self.captures.append(var)  # read before any op of the block made it: an outer value
        return self.runtime(var)

    def known(self, var):
        """Numpy value of a var folded by this plan (coremltools' .val may not know it)."""
        t = self.values.get(id(var))
        if t is None and self.parent is not None:
            return self.parent.known(var)
        return None if t is None or not isinstance(t, torch.Tensor) else t.detach().cpu().numpy()


def _const_to_tensor(var, device):
    val = var.val
    arr = np.ascontiguousarray(np.asarray(val))
    return torch.as_tensor(arr).to(device, storage_dtype(mil_name(var.dtype), device))


class _Args(OpArgs):
    def __init__(self, operation, device, slots):
        super().__init__(operation, device, slots.prepack)
        self._slots = slots

    def block(self, i):
        """The op's i-th nested block compiled (control flow builders)."""
        return BlockPlan(self.op.blocks[i], self._slots)

    def const(self, name, default=None):
        try:
            return super().const(name, default)
        except NotConstant:
            v = self.var(name)
            vals = [self._slots.known(x) for x in (v if isinstance(v, (tuple, list)) else [v])]
            if any(x is None for x in vals):
                raise
            return vals if isinstance(v, (tuple, list)) else vals[0]


def _finisher(fn, outputs, device, exact=False, rounding=True):
    """Casts each output to its declared dtype; on CPU rounds fp16 results through half precision unless
    `exact` (an op of EXACT_OPS) or not `rounding` (a fused plan)."""
    if not all(types.is_tensor(o.sym_type) or types.is_scalar(o.sym_type) for o in outputs):
        return fn  # list values (list ops, loops over lists) pass as they are
    specs = []
    for out in outputs:
        name = mil_name(out.dtype)
        rounds = rounding and device.type == "cpu" and name == "fp16" and not exact
        specs.append((storage_dtype(name, device), rounds))

    def finish(y, dt, rounds):
        if rounds:
            return y.to(torch.float16).to(torch.float32)
        return y if y.dtype == dt else y.to(dt)

    if len(specs) == 1:
        dt, rounds = specs[0]
        return lambda *xs: finish(fn(*xs), dt, rounds)
    return lambda *xs: tuple(finish(y, dt, r) for y, (dt, r) in zip(fn(*xs), specs))


def _build(op, device, slots, rounding=True):
    builder = BUILDERS.get(op.op_type)
    if builder is None:
        raise UnsupportedOpError(f"op {op.name!r} of type {op.op_type!r} is not supported by the MIL runtime")
    args = _Args(op, device, slots)
    try:
        fn, ins = builder(args)
    except NotConstant as e:
        raise UnsupportedOpError(
            f"op {op.name!r} of type {op.op_type!r}: input {e} is computed at run time; "
            "the MIL runtime needs it constant"
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as e:
        raise UnsupportedOpError(f"op {op.name!r} of type {op.op_type!r}: {e}") from None
    ignored = args.ignored_inputs()
    if ignored:
        raise UnsupportedOpError(
            f"op {op.name!r} of type {op.op_type!r}: the MIL runtime does not implement input(s) {ignored}"
        )
    return _finisher(fn, op.outputs, device, op.op_type in EXACT_OPS, rounding), list(ins), list(op.outputs)


class Plan:
    """fuse: rewrite attention and group-norm op chains into single PyTorch kernels and merge same-input
    projections into one GEMM (fusion.py). A fused plan on the CPU also computes fp16 ops in fp32 without
    rounding each result to fp16 (as Core ML's CPU compute unit runs an fp16 program): those two casts
    per op were a fifth of a CPU UNet step.
    shared_constants: a dict shared by the plans of one model's input-shape specializations, so
    its weights (and their decompressed constexpr values) sit on the device once.
    prepack: on the CPU, lay constant convolution and linear weights out for oneDNN at load (ops/onednn.py);
    not for a plan torch.compile traces (Inductor packs its own, and Dynamo takes no oneDNN tensors)."""

    def __init__(self, function, device, fuse=False, shared_constants=None, prepack=False):
        self.device = torch.device(device)
        self.prepack = prepack and self.device.type == "cpu"
        slots = _Slots(self.device, shared_constants, prepack=self.prepack)
        self.rounding = not fuse
        self.input_slots = {name: slots.runtime(var) for name, var in function.inputs.items()}
        fused, absorbed = find_fusions(function, self.prepack) if fuse else ({}, set())
        self.num_fused = len(fused)
        steps = []
        with torch.no_grad():
            for op in function.operations:
                if op.op_type == "const" or (id(op) in absorbed and id(op) not in fused):
                    continue
                kernel = fused.get(id(op))
                if kernel is not None:
                    fn, ins, outs = kernel
                    kernel = (_finisher(fn, outs, self.device, rounding=self.rounding), list(ins), list(outs))
                steps.extend(self._compile_op(op, slots, kernel, self.rounding))
        self.output_names = [v.name for v in function.outputs]
        self.output_slots = [slots.slot(v) for v in function.outputs]
        self.env_init = slots.env
        self.steps = self._with_frees(steps)
        self.num_constants = len(slots.constant)
        slots.prune_shared()

    @staticmethod
    def _compile_op(op, slots, kernel=None, rounding=True):
        decompressed = Plan._shared_decompressed(op, slots)
        if decompressed is not None:
            return []
        fn, ins, out_vars = kernel or _build(op, slots.device, slots, rounding)
        if op.op_type not in STATISTICAL and all(slots.is_constant(v) for v in ins):  # folded here, at load: bounded like coremltools' folding
            check_load_size(op, [v.sym_type for v in out_vars])
            result = fn(*[slots.constant_tensor(v) for v in ins])
            results = result if len(out_vars) > 1 else (result,)
            for var, value in zip(out_vars, results):
                slots.values[id(var)] = value
                if op.op_type.startswith("constexpr_") and _shared_key(var) is not None:
                    slots.share(_shared_key(var), value)
            return []
        in_slots = tuple(slots.slot(v) for v in ins)
        outs = [slots.runtime(v) for v in out_vars]
        return [(fn, in_slots, outs[0] if len(outs) == 1 else tuple(outs))]

    @staticmethod
    def _shared_decompressed(op, slots):
        """A constexpr op another specialization of this program already decompressed: reused."""
        if not op.op_type.startswith("constexpr_"):
            return None
        keys = [_shared_key(v) for v in op.outputs]
        if any(k is None or k not in slots.shared for k in keys):
            return None
        for var, k in zip(op.outputs, keys):
            slots.values[id(var)] = slots.shared[k]
        return True

    def _with_frees(self, steps):
        return _with_frees(steps, set(self.output_slots) | set(self.input_slots.values()) | self.constant_slots)

    @property
    def constant_slots(self):
        return {i for i, v in enumerate(self.env_init) if v is not None}

    def run(self, env):
        return _run_steps(self.steps, env, self.output_slots)


def _with_frees(steps, keep):
    """Each step with the slots whose last reader it is (freed right after it runs)."""
    last = {}
    for i, (_, ins, out, *_rest) in enumerate(steps):
        for s in (out,) if isinstance(out, int) else out:
            last[s] = i
        for s in ins:
            last[s] = i
    frees = [[] for _ in steps]
    for s, i in last.items():
        if s not in keep:
            frees[i].append(s)
    return [(fn, ins, out, tuple(f)) for (fn, ins, out), f in zip(steps, frees)]


def _run_steps(steps, env, output_slots):
    for fn, ins, out, free in steps:
        r = fn(*[env[i] for i in ins])
        if isinstance(out, int):  # (not out.__class__ is int: torch 2.11's Dynamo misreads that)
            env[out] = r
        else:
            for o, v in zip(out, r):
                env[o] = v
        for s in free:
            env[s] = None
    return [env[s] for s in output_slots]


# Builders that read no dimension of their operands at build time (ranks at most): inside a nested
# block a value may change shape between loop iterations (symbolic dimensions), and only these
# run there on such values; any other op on them is refused rather than run with a baked shape.
_BLOCK_SHAPE_AGNOSTIC = frozenset(
    "shape concat cond while_loop make_list list_length list_write list_read list_gather list_scatter "
    "read_state coreml_update_state range_1d".split())


def _shape_agnostic(op):
    if op.op_type == "concat":
        return not (op.interleave is not None and op.interleave.val)
    builder = BUILDERS.get(op.op_type)
    return op.op_type in _BLOCK_SHAPE_AGNOSTIC or (builder is not None and builder.__module__.endswith(".elementwise"))


def _check_fixed_shapes_in_block(op):
    values = list(op.outputs) + list(op.get_flattened_inputs())
    for v in values:
        if types.is_tensor(v.sym_type) and not all(isinstance(d, (int, np.integer)) for d in v.shape):
            if _shape_agnostic(op):
                return
            raise UnsupportedOpError(
                f"op {op.name!r} of type {op.op_type!r} inside a control-flow block has a value of a shape known "
                f"only at run time ({v.name}: {tuple(v.shape)}); the MIL runtime runs only shape-agnostic ops there")


class BlockPlan:
    """A nested block (a cond branch, a while_loop condition or body) compiled like a function:
    `run(block_inputs, captures)` -> the block's outputs. `captures` are the enclosing scopes'
    runtime values the block reads (its `captures` vars, which the op passes as extra inputs)."""

    def __init__(self, block, parent):
        slots = _Slots(parent.device, parent.shared, parent=parent)
        self.input_slots = [slots.runtime(v) for v in block.inputs]
        steps = []
        for op in block.operations:
            if op.op_type != "const":
                _check_fixed_shapes_in_block(op)
                steps.extend(Plan._compile_op(op, slots))
        self.output_slots = [slots.slot(v) for v in block.outputs]
        self.captures = list(slots.captures)
        self.capture_slots = [slots.index[id(v)] for v in self.captures]
        self.env_init = slots.env
        keep = set(self.output_slots) | set(self.input_slots) | set(self.capture_slots) | slots.constant
        self.steps = _with_frees(steps, keep)

    def run(self, inputs, captures):
        env = list(self.env_init)
        for s, v in zip(self.input_slots, inputs):
            env[s] = v
        for s, v in zip(self.capture_slots, captures):
            env[s] = v
        return _run_steps(self.steps, env, self.output_slots)
