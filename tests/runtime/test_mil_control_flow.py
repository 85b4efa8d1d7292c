"""cond, while_loop and the list ops: MIL programs with blocks that read outer values, nested
loops, lists grown in a loop, and a scripted torch module converted by coremltools, against numpy."""
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from mil_test_utils import run_mil
from python_coreml_sd.errors import UserError


@pytest.mark.parametrize("flag", [True, False])
def test_cond_picks_the_branch_and_reads_outer_values(tmp_path, flag):
    x = np.array([1.5, -2.0, 3.0], np.float32)
    s = np.array([2.0], np.float32)

    def build(x, s, p):
        scaled = mb.mul(x=x, y=s)  # computed outside, read inside both branches

        def then():
            return mb.add(x=scaled, y=1.0), mb.reduce_sum(x=x, axes=[0], keep_dims=True)

        def other():
            return mb.sub(x=x, y=scaled), mb.reduce_max(x=scaled, axes=[0], keep_dims=True)

        return mb.cond(pred=mb.squeeze(x=p), _true_fn=then, _false_fn=other)

    a, b = run_mil(build, {"x": x, "s": s, "p": np.array([flag])}, tmp_path)
    if flag:
        np.testing.assert_array_equal(a, x * 2 + 1)
        np.testing.assert_array_equal(b, [x.sum()])
    else:
        np.testing.assert_array_equal(a, x - x * 2)
        np.testing.assert_array_equal(b, [(x * 2).max()])


def test_nested_while_loops_read_values_two_scopes_up(tmp_path):
    x = np.array([0.0], np.float32)
    limit = np.array([20.0], np.float32)
    step = np.array([3.0], np.float32)

    def build(x, limit, step):
        def outer_cond(i, n):
            return mb.less(x=i, y=limit)

        def outer_body(i, n):
            def inner_cond(j):
                return mb.less(x=j, y=mb.add(x=i, y=step))  # i: the outer loop's value, step: the function's

            def inner_body(j):
                return mb.add(x=j, y=1.0)

            j = mb.while_loop(_cond=inner_cond, _body=inner_body, loop_vars=(i,))
            return mb.add(x=j, y=0.5), mb.add(x=n, y=1.0)

        return mb.while_loop(_cond=outer_cond, _body=outer_body, loop_vars=(x, mb.const(val=[0.0])))

    i, n, want_i, want_n = *run_mil(build, {"x": x, "limit": limit, "step": step}, tmp_path), 0.0, 0
    while want_i < 20:
        j = want_i
        while j < want_i + 3:
            j += 1
        want_i, want_n = j + 0.5, want_n + 1
    np.testing.assert_array_equal(i, [want_i])
    np.testing.assert_array_equal(n, [want_n])


def test_while_loop_that_never_runs_returns_its_inputs(tmp_path):
    def build(x):
        return mb.while_loop(_cond=lambda v: mb.less(x=v, y=-1.0), _body=lambda v: mb.mul(x=v, y=2.0), loop_vars=(x,))

    (out,) = run_mil(build, {"x": np.array([4.0], np.float32)}, tmp_path)
    np.testing.assert_array_equal(out, [4.0])


def test_list_grown_in_a_loop_then_gathered(tmp_path):
    update = np.array([1.0, -2.0, 0.5], np.float32)

    def build(n, update):
        def body(i, ls):
            value = mb.mul(x=update, y=mb.cast(x=i, dtype="fp32"))
            return mb.add(x=i, y=1), mb.list_write(ls=ls, index=i, value=value)

        def cond(i, ls):
            return mb.less(x=i, y=mb.squeeze(x=n))

        ls = mb.make_list(init_length=1, elem_shape=(3,))
        _, ls = mb.while_loop(_cond=cond, _body=body, loop_vars=(0, ls))
        length = mb.list_length(ls=ls)
        return mb.list_gather(ls=ls, indices=mb.range_1d(start=0, end=length, step=1)), length

    gathered, length = run_mil(build, {"n": np.array([4], np.int32), "update": update}, tmp_path)
    np.testing.assert_array_equal(gathered, np.arange(4)[:, None] * update)
    assert int(length) == 4


def test_list_scatter_read_and_unwritten_elements(tmp_path):
    a = np.array([1.0, 3.0], np.float32)

    def build(a):
        ls = mb.make_list(init_length=3, dynamic_length=False, elem_shape=(2,))
        ls = mb.list_scatter(ls=ls, indices=[2, 0], value=mb.stack(values=[a, mb.mul(x=a, y=-1.0)], axis=0))
        return mb.list_read(ls=ls, index=0), mb.list_gather(ls=ls, indices=[1, 2])

    first, rest = run_mil(build, {"a": a}, tmp_path)
    np.testing.assert_array_equal(first, -a)
    np.testing.assert_array_equal(rest, [[0, 0], a])  # element 1 never written: zeros


def test_fixed_length_list_write_past_its_end_is_an_error(tmp_path):
    def build(a, i):
        ls = mb.make_list(init_length=2, dynamic_length=False, elem_shape=(2,))
        return mb.list_read(ls=mb.list_write(ls=ls, index=mb.squeeze(x=i), value=a), index=0)

    (out,) = run_mil(build, {"a": np.ones(2, np.float32), "i": np.array([0], np.int32)}, tmp_path)
    np.testing.assert_array_equal(out, [1, 1])
    with pytest.raises(UserError, match="list index 5 out of range for a list of fixed length 2"):
        run_mil(build, {"a": np.ones(2, np.float32), "i": np.array([5], np.int32)}, tmp_path)


class Scripted(torch.nn.Module):
    def forward(self, x):
        while x.abs().sum() < 50.0:
            x = x * 2.0 + 1.0
        if x.mean() > 10.0:
            y = x - 3.0
        else:
            y = -x
        return y


@pytest.mark.parametrize("start", [[0.5, -0.25, 1.0], [30.0, 20.0, 10.0], [-4.0, -5.0, -6.0]])
def test_scripted_torch_loop_and_branch(tmp_path, start):
    import coremltools as ct
    from python_coreml_sd.runtime.mil import MILModel

    path = tmp_path / "scripted.mlpackage"
    ct.convert(torch.jit.script(Scripted()), inputs=[ct.TensorType(name="x", shape=(3,))], convert_to="mlprogram",
               compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16).save(str(path))
    model = MILModel(path)
    assert {"while_loop", "cond"} <= set(model.op_types)
    x = np.array(start, np.float32)
    out = next(iter(model.predict({"x": x}).values()))
    np.testing.assert_allclose(out, Scripted()(torch.from_numpy(x)).numpy(), rtol=1e-6)


def test_unsupported_op_inside_a_block_names_the_op_and_the_file(tmp_path):
    from python_coreml_sd.runtime.mil import UnsupportedOpError

    def build(x, p):
        def then():
            boxes, scores = np.zeros((1, 2, 4), np.float32), np.ones((1, 2, 1), np.float32)
            nms = mb.non_maximum_suppression(boxes=boxes, scores=scores, iou_threshold=0.5, max_boxes=1)
            return mb.add(x=x, y=mb.reduce_sum(x=nms[0]))

        return mb.cond(pred=mb.squeeze(x=p), _true_fn=then, _false_fn=lambda: mb.mul(x=x, y=2.0))

    with pytest.raises(UnsupportedOpError, match=r"\.mlpackage: op '.*' of type 'non_maximum_suppression' is not supported"):
        run_mil(build, {"x": np.ones(3, np.float32), "p": np.array([True])}, tmp_path)


def test_loop_var_that_changes_shape(tmp_path):
    """A body that doubles its loop var's length: elementwise ops and concat run on the
    run-time shapes; an op whose builder needs the shape is refused, never run with a wrong one."""
    from python_coreml_sd.runtime.mil import UnsupportedOpError

    def build(x):
        def cond(v):
            return mb.less(x=mb.reduce_sum(x=mb.shape(x=v), axes=[0]), y=10)

        def body(v):
            return mb.concat(values=[v, mb.mul(x=v, y=2.0)], axis=0)

        return mb.while_loop(_cond=cond, _body=body, loop_vars=(x,))

    (out,) = run_mil(build, {"x": np.array([1.0, -1.0, 0.5], np.float32)}, tmp_path)
    want = np.array([1.0, -1.0, 0.5])
    while want.size < 10:
        want = np.concatenate([want, want * 2])
    np.testing.assert_array_equal(out, want)

    def build_transpose(x):
        def body(v):
            return mb.transpose(x=mb.concat(values=[v, v], axis=1), perm=[1, 0])

        return mb.while_loop(_cond=lambda v: mb.less(x=mb.reduce_sum(x=mb.shape(x=v), axes=[0]), y=9),
                             _body=body, loop_vars=(x,))

    with pytest.raises(UnsupportedOpError, match=r"of type '(transpose|reduce_sum)' inside a control-flow block"):
        run_mil(build_transpose, {"x": np.ones((1, 2), np.float32)}, tmp_path)
