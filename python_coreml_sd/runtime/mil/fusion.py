"""Optional pattern fusion: rewrite op chains that coremltools emits for one PyTorch layer back into
the single fused PyTorch kernel (used on CUDA by default).

- attention: matmul(q, k, transpose_y) -> softmax(-1) -> matmul(., v) becomes
  F.scaled_dot_product_attention (flash / memory-efficient kernels; no L x L tensor in memory); so does
  the SPLIT_EINSUM layouts' einsum(q, k) -> softmax(key axis) -> einsum(., v), one head per chain, and
  their heads (and SPLIT_EINSUM_V2's query chunks) become one multi-head SDPA; the head reshapes /
  transposes and the query scale around an attention fold into its step.
- same-input projections: linears / 1x1 convolutions with constant weights reading one value (an
  attention's q, k, v; cross-attention's k, v) become one GEMM over the weights concatenated at load.
- group norm: reshape to groups -> mean -> sub -> square -> mean -> add eps -> sqrt -> real_div ->
  reshape back becomes F.group_norm.

A chain is fused only when its intermediate values feed nothing else, so the program's results are
unchanged up to rounding: fused kernels keep intermediates in fp32, where the per-op semantics round
each intermediate to the op's declared fp16.
"""
import torch
import torch.nn.functional as F

from .ops import onednn
from .ops.nn import can_prepack, gemm_rows, packed_pointwise_conv, pointwise_conv
from .ops.registry import Derived, is_weight


def _only_consumer(var, outputs):
    """The single op reading `var`, or None if it has several readers or is a program output."""
    if id(var) in outputs or len(var.child_ops) != 1:
        return None
    return var.child_ops[0]


def _scalar(var):
    if var is None or var.val is None:
        return None
    return var.val.item() if hasattr(var.val, "item") else var.val


def _t(x):
    return x.transpose(-1, -2)


def _sdpa(q, k, v, scale=1.0):
    """softmax(scale q k^T) v. Flash and memory-efficient kernels need each operand's last dimension
    contiguous; other views would send SDPA (and Inductor) to the math path, an L x L softmax in memory,
    so those are copied first (a few MB against L^2). A 4-d result is laid out (B, L, H, D) in memory
    (flash and cuDNN give that; otherwise one copy), so merging heads back into channels is a view."""
    lead = q.shape[:-3]
    flat = q.dim() > 4 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]  # not when batch axes broadcast
    if flat:  # the fused kernels take 4-d operands: leading axes as one (a view for size-1 axes)
        q, k, v = (t.flatten(0, -4) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if y.dim() == 4:
        y = y.transpose(1, 2).contiguous().transpose(1, 2)
    return y.unflatten(0, lead) if flat else y


def _attention(softmax, outputs):
    """S = softmax(Q K^T) then S V (diffusers) or V' S^T (channels-first layouts), any transposes."""
    if _scalar(softmax.axis) not in (-1, len(softmax.x.shape) - 1):
        return None
    scores = softmax.x.op
    if scores is None or scores.op_type != "matmul" or len(scores.x.shape) < 3:
        return None
    if _only_consumer(scores.outputs[0], outputs) is not softmax:
        return None
    probs, absorbed = softmax.outputs[0], [scores, softmax]
    out = _only_consumer(probs, outputs)
    swapped = out is not None and _swaps_last_axes(out)  # our ORIGINAL layout: an explicit S^T op
    if swapped:
        absorbed.append(out)
        probs = out.outputs[0]
        out = _only_consumer(probs, outputs)
    if out is None or out.op_type != "matmul" or (out.x is probs) == (out.y is probs):
        return None
    q_t, k_t = bool(_scalar(scores.transpose_x)), bool(_scalar(scores.transpose_y))
    o_tx, o_ty = bool(_scalar(out.transpose_x)), bool(_scalar(out.transpose_y))
    if out.x is probs and o_tx == swapped:
        values, flip = out.y, False  # S @ V (V^T if transpose_y)
        v_t = o_ty
    elif out.y is probs and o_ty != swapped:
        values, flip = out.x, True  # V' @ S^T = (S @ V'^T)^T, V' = V^T if transpose_x
        v_t = not o_tx
    else:
        return None

    def fn(a, b, v, scale=1.0):
        q = _t(a) if q_t else a
        k = b if k_t else _t(b)
        y = _sdpa(q, k, _t(v) if v_t else v, scale)
        return _t(y) if flip else y

    return out, absorbed + [out], fn, [scores.x, scores.y, values]


def _swaps_last_axes(op):
    if op.op_type != "transpose" or op.perm.val is None:
        return False
    perm = [int(i) for i in op.perm.val]
    return perm[-2:] == [len(perm) - 1, len(perm) - 2] and perm[:-2] == list(range(len(perm) - 2))


def _einsum_letters(op):
    """The operands' and the result's subscripts of a two-operand einsum without `...`, else None."""
    equation = _scalar(op.equation)
    if not isinstance(equation, str) or "." in equation or len(op.values) != 2:
        return None
    ins, out = equation.replace(" ", "").split("->")
    a, b = ins.split(",")
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    return a, b, out


def _einsum_scores(scores, axis):
    """Roles of scores = einsum(x, y) with softmax over `axis`: (batch letters, q, k, c, which operand
    holds the queries), or None. Each operand is batch + {query or key} + {contracted channel}."""
    letters = _einsum_letters(scores)
    if letters is None:
        return None
    a, b, s = letters
    k = s[axis]
    batch = [t for t in s if t in a and t in b]
    free = [t for t in s if t not in batch and t != k]
    contracted = [t for t in a if t in b and t not in s]
    if len(free) != 1 or len(contracted) != 1 or len(batch) + 2 != len(s):
        return None
    q, c = free[0], contracted[0]
    q_first = set(a) == {*batch, q, c} and set(b) == {*batch, k, c}
    if not q_first and not (set(b) == {*batch, q, c} and set(a) == {*batch, k, c}):
        return None
    return batch, q, k, c, q_first


def _einsum_values(out, probs, roles):
    """The value side of the second einsum: (values var, its subscripts, the result's subscripts, and the
    batch / query / key / channel letters renamed as that equation writes them), or None."""
    letters = _einsum_letters(out)
    if letters is None:
        return None
    (x2, y2, o2), (s, batch, q, k) = letters, roles
    if out.values[0] is probs and out.values[1] is not probs:
        p2, v2, values = x2, y2, out.values[1]
    elif out.values[1] is probs and out.values[0] is not probs:
        p2, v2, values = y2, x2, out.values[0]
    else:
        return None
    rename = dict(zip(s, p2))  # the probabilities' letters in the second equation, by position
    batch2, q2, k2 = [rename[t] for t in batch], rename[q], rename[k]
    channel = [t for t in v2 if t not in p2]
    if len(channel) != 1 or set(v2) != {*batch2, k2, *channel} or set(o2) != {*batch2, q2, *channel}:
        return None
    return values, v2, o2, batch2, q2, k2, channel[0]


def _einsum_attention(softmax, outputs):
    """softmax(einsum(q, k)) along the key axis, then einsum with v: the SPLIT_EINSUM(_V2) layouts."""
    scores = softmax.x.op
    if scores is None or scores.op_type != "einsum" or _only_consumer(scores.outputs[0], outputs) is not softmax:
        return None
    roles = _einsum_scores(scores, int(_scalar(softmax.axis)) % len(softmax.x.shape))
    out = _only_consumer(softmax.outputs[0], outputs)
    if roles is None or out is None or out.op_type != "einsum":
        return None
    batch, q, k, c, q_first = roles
    a, b, s = _einsum_letters(scores)
    value_side = _einsum_values(out, softmax.outputs[0], (s, batch, q, k))
    if value_side is None:
        return None
    values, v_sub, o_sub, batch2, q2, k2, channel = value_side
    (queries, q_sub), (keys, k_sub) = ((scores.values[0], a), (scores.values[1], b))[::1 if q_first else -1]
    sizes = [dict(zip(sub, var.shape)) for var, sub in ((queries, q_sub), (keys, k_sub), (values, v_sub))]
    if any(sizes[0][t] != sizes[1][t] or sizes[0][t] != sizes[2][t2] for t, t2 in zip(batch, batch2)):
        return None  # broadcast batch dimensions: left to the per-op steps
    to_q = [q_sub.index(t) for t in (*batch, q, c)]
    to_k = [k_sub.index(t) for t in (*batch, k, c)]
    to_v = [v_sub.index(t) for t in (*batch2, k2, channel)]
    back = [[*batch2, q2, channel].index(t) for t in o_sub]

    def fn(x, y, v, scale=1.0):
        return _sdpa(x.permute(to_q), y.permute(to_k), v.permute(to_v), scale).permute(back)

    fn.perms = tuple(map(tuple, (to_q, to_k, to_v, back)))  # for _multi_head
    return out, [scores, softmax, out], fn, [queries, keys, values]


def _view(op):
    """A reshape (to a fixed shape) or transpose as a torch function (a view where strides allow), else None."""
    if op is None or op.op_type not in ("reshape", "transpose"):
        return None
    if op.op_type == "transpose":
        perm = None if op.perm.val is None else [int(i) for i in op.perm.val]
        return None if perm is None else (lambda t: t.permute(perm))
    shape = op.outputs[0].shape
    return (lambda t: t.reshape(shape)) if all(isinstance(d, int) for d in shape) else None


def _scalar_factor(op):
    """(the other operand, c) of a mul by a constant scalar c, else None."""
    if op.op_type != "mul":
        return None
    for v, other in ((op.y, op.x), (op.x, op.y)):
        c = _scalar(v) if v.val is not None and getattr(v.val, "size", 1) == 1 else None
        if isinstance(c, float) and other.val is None:
            return other, c
    return None


def _apply(t, fns):
    for f in fns:
        t = f(t)
    return t


def _with_views(match, outputs):
    """Folds into an attention step the single-reader reshapes / transposes around it (ORIGINAL's head
    split and merge) and a constant scalar multiplying the queries or keys (SDPA's scale, applied in fp32
    rather than rounding q to fp16): the step reads the projections and writes the merged heads through
    torch views, with no copies where strides allow and fewer steps."""
    anchor, ops, fn, ins = match
    pre, sources, scale = [], [], 1.0
    for i, var in enumerate(ins):
        views = []
        while var.op is not None and _only_consumer(var, outputs) is not None:
            view, factor = _view(var.op), None if i == 2 else _scalar_factor(var.op)
            if view is None and factor is None:
                break
            ops.append(var.op)
            if view is not None:
                views.insert(0, view)
                var = var.op.x
            else:
                var, scale = factor[0], scale * factor[1]
        pre.append(views)
        sources.append(var)
    post = []
    while _view(_only_consumer(anchor.outputs[0], outputs)) is not None:
        anchor = _only_consumer(anchor.outputs[0], outputs)
        post.append(_view(anchor))
        ops.append(anchor)

    def fused(*xs):
        return _apply(fn(*[_apply(x, views) for x, views in zip(xs, pre)], scale=scale), post)

    return anchor, ops, fused, sources


def _einsum_result(value, concat, outputs):
    """The einsum attention match whose result is `value`, read by `concat` alone, else None."""
    out = value.op
    if out is None or out.op_type != "einsum" or _only_consumer(value, outputs) is not concat:
        return None
    softmax = next((x.op for x in out.values if x.op is not None and x.op.op_type == "softmax"), None)
    match = None if softmax is None else _einsum_attention(softmax, outputs)
    return match if match is not None and match[0] is out else None


def _query_chunks(concat, outputs):
    """SPLIT_EINSUM_V2's query chunks: concat, along the result's queries, of einsum attentions whose
    queries are one split's parts along the query axis and whose keys and values are shared: one
    attention over all the queries (each query's row is independent of the others)."""
    chunks = [_einsum_result(v, concat, outputs) for v in concat.values]
    if len(chunks) < 2 or any(c is None for c in chunks) or len({c[2].perms for c in chunks}) != 1:
        return None
    split, (to_q, _, _, back) = chunks[0][3][0].op, chunks[0][2].perms
    if split is None or split.op_type != "split" or split.axis.val is None or len(split.outputs) != len(chunks):
        return None
    if int(_scalar(split.axis)) % len(split.x.shape) != to_q[-2] or concat.axis.val is None or \
            int(_scalar(concat.axis)) % len(back) != back.index(len(back) - 2):
        return None  # not cut along the queries, or not joined along them
    shared = chunks[0][3][1:]  # the keys and values every chunk reads
    if any(c[3][0] is not o or _only_consumer(o, outputs) is None or any(a is not b for a, b in zip(c[3][1:], shared))
           for c, o in zip(chunks, split.outputs)):
        return None
    return concat, [op for c in chunks for op in c[1]] + [split, concat], chunks[0][2], [split.x, *shared]


def _head(value, concat, outputs):
    """One head's attention (a match with `perms`) whose result is `value`, read by `concat` alone."""
    if value.op is not None and value.op.op_type == "concat" and _only_consumer(value, outputs) is concat:
        return _query_chunks(value.op, outputs)
    return _einsum_result(value, concat, outputs)


def _head_splits(heads, outputs):
    """For each operand, the split op whose i-th output head i reads (equal parts, each read only inside
    its head), else None."""
    splits = []
    for j in range(3):
        split = heads[0][3][j].op
        if split is None or split.op_type != "split" or len(split.outputs) != len(heads) or split.axis.val is None:
            return None
        for h, o in zip(heads, split.outputs):
            inside = {id(op) for op in h[1]}
            if h[3][j] is not o or id(o) in outputs or any(id(r) not in inside for r in o.child_ops):
                return None
        if len({tuple(o.shape) for o in split.outputs}) != 1:
            return None
        splits.append(split)
    return splits


def _multi_head(concat, outputs):
    """SPLIT_EINSUM(_V2): concat(one einsum attention per head, or its query chunks), the heads cut from
    q, k and v by one split each: one SDPA over the heads stacked as an axis, the heads' chains being parallel (the same
    subscripts) and independent (each reads only its own parts)."""
    if concat.axis.val is None or _scalar(concat.interleave) or len(concat.values) < 2:
        return None
    heads = [_head(v, concat, outputs) for v in concat.values]
    if any(h is None for h in heads) or len({h[2].perms for h in heads}) != 1:
        return None
    splits = _head_splits(heads, outputs)
    if splits is None:
        return None
    n, (to_q, to_k, to_v, back) = len(heads), heads[0][2].perms
    axes = [int(_scalar(s.axis)) % len(s.x.shape) for s in splits]
    axis = int(_scalar(concat.axis)) % len(concat.outputs[0].shape)

    def stacked(t, split_axis, perm):  # (*batch, heads, L, E): head i is split output i, permuted
        t = t.unflatten(split_axis, (n, -1)).movedim(split_axis, 0)
        return t.permute([0, *(i + 1 for i in perm)]).movedim(0, -3)

    def fn(q, k, v, scale=1.0):
        y = _sdpa(*(stacked(t, a, p) for t, a, p in zip((q, k, v), axes, (to_q, to_k, to_v))), scale)
        y = y.movedim(-3, 0).permute([0, *(i + 1 for i in back)])
        return y.movedim(0, axis).flatten(axis, axis + 1)

    ops = [op for h in heads for op in h[1]] + splits + [concat]
    return concat, ops, fn, [s.x for s in splits]


def _chain(var, outputs, *types):
    """Follows single-consumer links through ops of `types`; returns the ops or None."""
    ops = []
    for t in types:
        op = _only_consumer(var, outputs)
        if op is None or op.op_type != t:
            return None
        ops.append(op)
        var = op.outputs[0]
    return ops


def _group_norm(reshape, outputs):
    x = reshape.x
    if len(x.shape) < 3 or len(reshape.outputs[0].shape) != len(x.shape) + 1:
        return None
    grouped = reshape.outputs[0]
    if tuple(grouped.shape[0:1]) != tuple(x.shape[0:1]) or grouped.shape[1] * grouped.shape[2] != x.shape[1]:
        return None
    readers = grouped.child_ops
    if id(grouped) in outputs or len(readers) != 2:
        return None
    mean = next((o for o in readers if o.op_type == "reduce_mean"), None)
    sub = next((o for o in readers if o.op_type == "sub"), None)
    if mean is None or sub is None or sub.x is not grouped or sub.y is not mean.outputs[0]:
        return None
    axes = list(range(2, len(grouped.shape)))
    if sorted(a % len(grouped.shape) for a in mean.axes.val) != axes or not _scalar(mean.keep_dims):
        return None
    sub_out = sub.outputs[0]
    if id(sub_out) in outputs or len(sub_out.child_ops) != 2:
        return None
    square = next((o for o in sub_out.child_ops if o.op_type == "square"), None)
    div = next((o for o in sub_out.child_ops if o.op_type == "real_div"), None)
    if square is None or div is None or div.x is not sub_out:
        return None
    tail = _chain(square.outputs[0], outputs, "reduce_mean", "add", "sqrt")
    if tail is None or div.y is not tail[-1].outputs[0]:
        return None
    var_mean, add_eps, _ = tail
    if sorted(a % len(grouped.shape) for a in var_mean.axes.val) != axes:
        return None
    eps = _scalar(add_eps.y) if add_eps.x is var_mean.outputs[0] else None
    back = _only_consumer(div.outputs[0], outputs)
    if eps is None or back is None or back.op_type != "reshape" or tuple(back.outputs[0].shape) != tuple(x.shape):
        return None
    groups = int(grouped.shape[1])
    fn = lambda t: F.group_norm(t, groups, eps=float(eps))  # noqa: E731
    return back, [reshape, mean, sub, square, *tail, div, back], fn, [x]


def _ints(var):
    return [] if var is None or var.val is None else [int(i) for i in var.val]


def _projection(op):
    """(x, weight, bias or None) of a linear or a 1x1, stride-1, unpadded, ungrouped convolution whose
    weight and bias are constants of x's dtype, else None."""
    bias = op.bias if "bias" in op.inputs else None
    if op.op_type not in ("linear", "conv") or not is_weight(op.weight) or (bias is not None and not is_weight(bias)):
        return None
    if any(v is not None and v.dtype != op.x.dtype for v in (op.weight, bias, op.outputs[0])):
        return None
    if op.op_type == "conv":
        pads = _ints(op.pad) if _scalar(op.pad_type) == "custom" else []
        if len(op.weight.shape) != 4 or tuple(op.weight.shape[2:]) != (1, 1) or any(pads) or \
                any(i != 1 for i in _ints(op.strides)) or int(_scalar(op.groups) or 1) != 1:
            return None
    elif len(op.weight.shape) != 2:
        return None
    channels = op.x.shape[1 if op.op_type == "conv" else -1]
    if not all(isinstance(d, int) for d in op.weight.shape) or op.weight.shape[1] != channels:
        return None
    return op.x, op.weight, bias


def _merged_gemm(ops, prepack=False):
    """One GEMM for same-input projections (same op type): weights concatenated along the output
    channels at load (a missing bias is zeros: adding 0 changes no value), the result split back.
    prepack: the merged weight laid out for oneDNN where it can be (ops/onednn.py)."""
    sizes = [int(op.weight.shape[0]) for op in ops]
    conv, x = ops[0].op_type == "conv", ops[0].x
    axis = 1 if conv else -1
    packable = prepack and can_prepack("cpu", x, ops[0].weight, [o.outputs[0] for o in ops])
    rows = gemm_rows(x.shape, axis) if packable else None

    def weights(*ws):
        w = torch.cat([w.reshape(w.shape[0], w.shape[1]) for w in ws])
        return w if rows is None else onednn.pack_linear(w, rows)

    ins = [x, Derived(weights, [op.weight for op in ops], ("merged", rows))]
    biases = [op.bias if "bias" in op.inputs else None for op in ops]
    if any(b is not None for b in biases):
        present = [b for b in biases if b is not None]

        def bias(*bs):
            it = iter(bs)
            return torch.cat([next(it) if b is not None else bs[0].new_zeros(n) for b, n in zip(biases, sizes)])

        ins.append(Derived(bias, present))

    if rows is not None:
        gemm = packed_pointwise_conv if conv else onednn.linear
    else:  # a 1x1 convolution as the per-op plan runs it: channels-last GEMM, logically NCHW
        gemm = pointwise_conv if conv else F.linear

    def fn(x, w, b=None):
        return gemm(x, w, b).split(sizes, axis)

    return ops[0], ops, fn, ins, [op.outputs[0] for op in ops]


def _gemm_groups(function, absorbed):
    """Projections not yet absorbed, grouped by (input var, op type), program order kept."""
    groups = {}
    for op in function.operations:
        match = None if id(op) in absorbed else _projection(op)
        if match is not None:
            groups.setdefault((id(match[0]), op.op_type), []).append(op)
    return [ops for ops in groups.values() if len(ops) > 1]


def find_fusions(function, prepack=False):
    """{id(anchor op): (fn, input vars, output vars)} and the ids of every op the fusions absorb. The anchor's
    step writes the outputs of all the ops it replaces (several for merged GEMMs)."""
    outputs = {id(v) for v in function.outputs}
    fused, absorbed = {}, set()

    def add(anchor, ops, fn, ins, outs=None):
        if not any(id(o) in absorbed for o in ops):
            absorbed.update(id(o) for o in ops)
            fused[id(anchor)] = (fn, ins, anchor.outputs if outs is None else outs)

    for kind in (_multi_head, _query_chunks):  # multi-head attention first: it takes the per-head chains
        for op in function.operations:
            match = kind(op, outputs) if op.op_type == "concat" else None
            if match is not None:
                add(*_with_views(match, outputs))
    for op in function.operations:
        match = None
        if id(op) in absorbed:
            continue
        if op.op_type == "softmax":
            match = _attention(op, outputs) or _einsum_attention(op, outputs)
            match = match and _with_views(match, outputs)
        elif op.op_type == "reshape":
            match = _group_norm(op, outputs)
        if match is not None:
            add(*match)
    for ops in _gemm_groups(function, absorbed):
        add(*_merged_gemm(ops, prepack))
    return fused, absorbed
