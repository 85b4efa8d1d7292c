"""Optional pattern fusion: rewrite op chains that coremltools emits for one PyTorch layer back into
the single fused PyTorch kernel (used on CUDA by default).

- attention: matmul(q, k, transpose_y) -> softmax(-1) -> matmul(., v) becomes
  F.scaled_dot_product_attention (flash / memory-efficient kernels; no L x L tensor in memory).
- group norm: reshape to groups -> mean -> sub -> square -> mean -> add eps -> sqrt -> real_div ->
  reshape back becomes F.group_norm.

A chain is fused only when its intermediate values feed nothing else, so the program's results are
unchanged up to rounding: fused kernels keep intermediates in fp32, where the per-op semantics round
each intermediate to the op's declared fp16.
"""
import torch.nn.functional as F


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


def _attention(softmax, outputs):
    """S = softmax(Q K^T) then S V (diffusers) or V' S^T (channels-first layouts), any transposes."""
    if _scalar(softmax.axis) not in (-1, len(softmax.x.shape) - 1):
        return None
    scores = softmax.x.op
    if scores is None or scores.op_type != "matmul" or len(scores.x.shape) < 3:
        return None
    if _only_consumer(scores.outputs[0], outputs) is not softmax:
        return None
    out = _only_consumer(softmax.outputs[0], outputs)
    if out is None or out.op_type != "matmul":
        return None
    probs = softmax.outputs[0]
    q_t, k_t = bool(_scalar(scores.transpose_x)), bool(_scalar(scores.transpose_y))
    o_tx, o_ty = bool(_scalar(out.transpose_x)), bool(_scalar(out.transpose_y))
    if out.x is probs and out.y is not probs and not o_tx:
        values, flip = out.y, False  # S @ V (V^T if transpose_y)
        v_t = o_ty
    elif out.y is probs and out.x is not probs and o_ty:
        values, flip = out.x, True  # V' @ S^T = (S @ V'^T)^T, V' = V^T if transpose_x
        v_t = not o_tx
    else:
        return None

    def fn(a, b, v):
        q = _t(a) if q_t else a
        k = b if k_t else _t(b)
        y = F.scaled_dot_product_attention(q, k, _t(v) if v_t else v, scale=1.0)
        return _t(y) if flip else y

    return out, [scores, softmax, out], fn, [scores.x, scores.y, values]


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


def find_fusions(function):
    """{id(anchor op): (fn, input vars)} and the ids of every op the fusions absorb."""
    outputs = {id(v) for v in function.outputs}
    fused, absorbed = {}, set()
    for op in function.operations:
        if id(op) in absorbed:
            continue
        match = None
        if op.op_type == "softmax":
            match = _attention(op, outputs)
        elif op.op_type == "reshape":
            match = _group_norm(op, outputs)
        if match is None:
            continue
        anchor, ops, fn, ins = match
        if any(id(o) in absorbed for o in ops):
            continue
        absorbed.update(id(o) for o in ops)
        fused[id(anchor)] = (fn, ins)
    return fused, absorbed


