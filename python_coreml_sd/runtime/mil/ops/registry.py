"""Op builders: one function per MIL op type, turning a PyMIL operation into a kernel.

A builder receives an `OpArgs` and returns `(fn, input_vars)`: `fn(*tensors)` computes the op's
output(s) from the runtime tensors of `input_vars`. Everything that is constant in the program
(attributes, axes, pad amounts, equations) is read once here and baked into `fn`, so the hot
loop does no lookups.
"""
import numpy as np
import torch

from ..dtypes import mil_name, storage_dtype

BUILDERS = {}

# Ops whose values match Core ML's only in distribution (its random streams are not documented):
# never folded at load, so an unseeded one draws anew at every call; tests check them statistically.
STATISTICAL = frozenset(("random_bernoulli", "random_categorical", "random_normal", "random_uniform"))


def op(*names):
    def register(fn):
        for name in names:
            BUILDERS[name] = fn
        return fn

    return register


class Derived:
    """A constant the plan computes once, at load, as fn(*vars' values) (vars: constants). `tag` tells
    apart derivations of the same vars (it joins their key when input-shape specializations share them)."""

    def __init__(self, fn, vars, tag=None):
        self.fn, self.vars, self.tag = fn, list(vars), tag


def is_weight(var):
    """A const, or a constexpr's result (decompressed at load): a constant a Derived may read."""
    op = None if var is None else var.op
    return op is not None and (op.op_type == "const" or op.op_type.startswith("constexpr_"))


class NotConstant(Exception):
    """An attribute the runtime needs at build time is computed at run time."""


class OpArgs:
    def __init__(self, operation, device, prepack=False):
        self.op = operation
        self.device = device
        self.prepack = prepack  # CPU: constant weights may be laid out for oneDNN at load (onednn.py)
        self.type = operation.op_type
        self.name = operation.name
        self.accessed = set()

    def var(self, name):
        self.accessed.add(name)
        return getattr(self.op, name, None)

    def covers(self, *names):
        """Marks inputs whose meaning the builder takes from elsewhere (e.g. the declared shape)."""
        self.accessed.update(names)

    def ignored_inputs(self):
        """Inputs the program sets that the builder never looked at: running would drop them."""
        return sorted(set(self.op.inputs) - self.accessed)

    def has(self, name):
        return self.var(name) is not None

    def const(self, name, default=None):
        """Compile-time value of an input (numpy array, scalar or str)."""
        v = self.var(name)
        if v is None:
            return default
        if isinstance(v, (tuple, list)):
            vals = [x.val for x in v]
            if any(x is None for x in vals):
                raise NotConstant(name)
            return vals
        if v.val is None:
            raise NotConstant(name)
        return v.val

    def ints(self, name, default=None):
        val = self.const(name, None)
        if val is None:
            return default
        return [int(i) for i in np.asarray(val).reshape(-1)]

    def scalar(self, name, default=None):
        val = self.const(name, None)
        if val is None:
            return default
        return np.asarray(val).reshape(-1)[0].item()

    @property
    def out_shape(self):
        return tuple(self.op.outputs[0].shape)

    def out_shapes(self):
        return [tuple(o.shape) for o in self.op.outputs]

    def in_shape(self, name="x"):
        return tuple(self.var(name).shape)

    def out_mil_dtype(self, i=0):
        return mil_name(self.op.outputs[i].dtype)

    def out_torch_dtype(self, i=0):
        return storage_dtype(self.out_mil_dtype(i), self.device)

    def out_elem_torch_dtype(self, i=0):
        """Storage dtype of the elements of a list output."""
        return storage_dtype(mil_name(self.op.outputs[i].elem_type.get_primitive()), self.device)

    def tensor(self, value, mil_dtype):
        """A constant on the device, held in the storage dtype of `mil_dtype`."""
        arr = np.ascontiguousarray(value)
        return torch.as_tensor(arr).to(self.device, storage_dtype(mil_dtype, self.device))


def static(shape):
    return all(isinstance(d, (int, np.integer)) for d in shape)


def norm_axes(axes, rank):
    return [a + rank if a < 0 else a for a in axes]
