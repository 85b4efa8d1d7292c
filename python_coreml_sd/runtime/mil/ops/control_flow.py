"""Control flow (cond, while_loop) and the list ops (make_list, list_*).

Nested blocks are compiled into `plan.BlockPlan`s by `OpArgs.block(i)`. A block may read values of
the enclosing scopes (its `captures`): the op passes them as extra runtime inputs, so the plan's
slot bookkeeping (and freeing) sees every value a block needs.

Lists are immutable `TensorList`s: list_write / list_scatter return a new list (the MIL ops are
functional, and a loop body may still hold the previous list).
"""
import torch

from ....errors import UserError
from .registry import op

# A while_loop iterates until its condition is false; a damaged or crafted package could make
# that never happen. No program Core ML converters emit comes close to this many iterations.
MAX_LOOP_ITERATIONS = 1 << 24

_BLOCK_INPUTS = ("_existing_blocks", "_true_fn", "_false_fn", "_cond", "_body")


def _single_or_tuple(outs, n):
    return outs[0] if n == 1 else tuple(outs)


@op("cond")
def cond(a):
    a.covers(*_BLOCK_INPUTS)
    then, other = a.block(0), a.block(1)
    split, n = len(then.captures), len(a.op.outputs)

    def fn(pred, *captures):
        if bool(pred):
            return _single_or_tuple(then.run((), captures[:split]), n)
        return _single_or_tuple(other.run((), captures[split:]), n)

    return fn, [a.var("pred"), *then.captures, *other.captures]


@op("while_loop")
def while_loop(a):
    a.covers(*_BLOCK_INPUTS)
    loop_vars = list(a.var("loop_vars"))
    test, body = a.block(0), a.block(1)
    k, split = len(loop_vars), len(loop_vars) + len(test.captures)

    def fn(*xs):
        values, test_caps, body_caps = xs[:k], xs[k:split], xs[split:]
        for _ in range(MAX_LOOP_ITERATIONS):
            if not bool(test.run(values, test_caps)[0]):
                return _single_or_tuple(values, k)
            values = body.run(values, body_caps)
        raise UserError(f"while_loop {a.name!r} ran {MAX_LOOP_ITERATIONS} iterations without its condition "
                        "becoming false (runtime.mil.ops.control_flow.MAX_LOOP_ITERATIONS)")

    return fn, [*loop_vars, *test.captures, *body.captures]


class TensorList:
    """items: a tuple of tensors, None where nothing was written yet (read as zeros of the
    element shape when the program declares it)."""

    __slots__ = ("items", "dynamic", "elem_shape", "dtype", "device")

    def __init__(self, items, dynamic, elem_shape, dtype, device):
        self.items, self.dynamic = tuple(items), dynamic
        self.elem_shape, self.dtype, self.device = elem_shape, dtype, device

    def with_items(self, writes):
        """A new list with {index: tensor} written; a dynamic list grows to fit."""
        items = list(self.items)
        for i, value in writes:
            if i < 0 or (i >= len(items) and not self.dynamic):
                raise UserError(f"list index {i} out of range for a list of fixed length {len(items)}")
            items.extend([None] * (i + 1 - len(items)))
            items[i] = value
        return TensorList(items, self.dynamic, self.elem_shape, self.dtype, self.device)

    def read(self, i):
        if not -len(self.items) <= i < len(self.items):
            raise UserError(f"list index {i} out of range for a list of length {len(self.items)}")
        item = self.items[i]
        if item is None:
            if self.elem_shape is None:
                raise UserError(f"list element {i} was never written and the list has no element shape")
            return torch.zeros(self.elem_shape, dtype=self.dtype, device=self.device)
        return item


def _elem_shape(a):
    shape = [x.val for x in a.var("elem_shape") or []]
    if any(isinstance(d, str) for d in shape):
        return None  # symbolic (string) dims: known from the first write
    return tuple(int(d) for d in shape)


@op("make_list")
def make_list(a):
    a.covers("dynamic_length", "dtype")
    dynamic = bool(a.op.dynamic_length.val)
    elem_shape, dtype = _elem_shape(a), a.out_elem_torch_dtype()
    if not a.has("init_length"):
        return (lambda: TensorList([None], dynamic, elem_shape, dtype, a.device)), []
    return (lambda n: TensorList([None] * int(n), dynamic, elem_shape, dtype, a.device)), [a.var("init_length")]


@op("list_length")
def list_length(a):
    return (lambda ls: torch.tensor(len(ls.items), dtype=torch.int32, device=a.device)), [a.var("ls")]


@op("list_write")
def list_write(a):
    return (lambda ls, i, v: ls.with_items([(int(i), v)])), [a.var("ls"), a.var("index"), a.var("value")]


@op("list_read")
def list_read(a):
    return (lambda ls, i: ls.read(int(i))), [a.var("ls"), a.var("index")]


@op("list_gather")
def list_gather(a):
    def fn(ls, indices):
        return torch.stack([ls.read(i) for i in indices.reshape(-1).tolist()])

    return fn, [a.var("ls"), a.var("indices")]


@op("list_scatter")
def list_scatter(a):
    def fn(ls, indices, value):
        return ls.with_items(list(zip(indices.reshape(-1).tolist(), value.unbind(0))))

    return fn, [a.var("ls"), a.var("indices"), a.var("value")]
