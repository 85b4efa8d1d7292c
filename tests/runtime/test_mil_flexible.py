"""Flexible input shapes (RangeDim, EnumeratedShapes): real torch modules converted by coremltools,
run at every allowed shape against the torch module; a shape the model does not allow is a one-line
UserError naming the input, the shape given and the shapes allowed."""
import numpy as np
import pytest
import torch

from python_coreml_sd.errors import UserError
from python_coreml_sd.runtime.mil import MILModel


class ConvAttention(torch.nn.Module):
    """Conv, self-attention over the H*W positions (reshapes through the run-time shape), conv:
    the shape arithmetic of a UNet block at a resolution the program does not fix."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = torch.nn.Linear(8, 24)
        self.conv_out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv_in(x)
        b, c, hh, ww = h.shape
        tokens = h.reshape(b, c, hh * ww).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, c, hh, ww) + h
        return self.conv_out(h)


class AddBias(torch.nn.Module):
    def forward(self, x, bias):
        return torch.nn.functional.gelu(x * 3.0) + bias.sum()


def _convert(module, example, inputs, path, precision="fp32"):
    import coremltools as ct

    traced = torch.jit.trace(module.eval(), example)
    ct.convert(traced, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
               compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16).save(str(path))
    return path


@pytest.fixture(scope="module")
def range_model(tmp_path_factory):
    import coremltools as ct

    shape = ct.Shape((ct.RangeDim(1, 2, default=1), 3, ct.RangeDim(4, 16, default=8), ct.RangeDim(4, 64, default=8)))
    path = tmp_path_factory.mktemp("flex") / "range.mlpackage"
    return _convert(ConvAttention(), (torch.rand(1, 3, 8, 8),), [ct.TensorType(name="x", shape=shape)], path)


@pytest.fixture(scope="module")
def enumerated_model(tmp_path_factory):
    import coremltools as ct

    path = tmp_path_factory.mktemp("flex") / "enumerated.mlpackage"
    shapes = ct.EnumeratedShapes([(1, 3, 8, 8), (2, 3, 16, 8), (1, 3, 4, 12)], default=(2, 3, 16, 8))
    return _convert(ConvAttention(), (torch.rand(2, 3, 16, 8),), [ct.TensorType(name="x", shape=shapes)], path, "fp16")


def _reference(x):
    with torch.no_grad():
        return ConvAttention().eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 4, 4), (1, 3, 16, 5), (2, 3, 12, 40)])
def test_range_dims_run_at_any_allowed_shape(range_model, shape):
    model = MILModel(range_model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = next(iter(model.predict({"x": x}).values()))
    assert out.shape == (shape[0], 4, shape[2], shape[3])
    np.testing.assert_allclose(out, _reference(x), rtol=1e-4, atol=1e-4)


def test_description_names_default_and_allowed_shapes(range_model, enumerated_model):
    desc = MILModel(range_model).input_description["x"]
    assert desc.shape == (1, 3, 8, 8)
    assert str(desc.allowed) == "(1..2, 3, 4..16, 4..64)"
    desc = MILModel(enumerated_model).input_description["x"]
    assert desc.shape == (2, 3, 16, 8)
    assert sorted(desc.allowed.shapes) == [(1, 3, 4, 12), (1, 3, 8, 8), (2, 3, 16, 8)]  # coremltools lists the default first


@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (1, 3, 17, 8), (1, 3, 8, 3), (1, 3, 8, 65), (1, 4, 8, 8), (1, 3, 8)])
def test_range_shape_outside_the_ranges_is_one_line_error(range_model, shape):
    model = MILModel(range_model)
    want = rf"input 'x' has shape \({', '.join(map(str, shape))}\); the model allows \(1\.\.2, 3, 4\.\.16, 4\.\.64\) \(float32\)"
    with pytest.raises(UserError, match="^" + want + "$"):
        model.predict({"x": np.zeros(shape, np.float32)})


def test_enumerated_shapes_run_each_shape_and_refuse_others(enumerated_model):
    model = MILModel(enumerated_model)
    rng = np.random.default_rng(2)
    for shape in [(1, 3, 8, 8), (2, 3, 16, 8), (1, 3, 4, 12), (1, 3, 8, 8)]:
        x = rng.standard_normal(shape).astype(np.float32)
        out = next(iter(model.predict({"x": x}).values()))
        np.testing.assert_allclose(out, _reference(x), rtol=0.02, atol=0.02)  # fp16 program
    assert len(model._specializations) == 3  # the repeated shape reuses its plan
    with pytest.raises(UserError, match=r"^input 'x' has shape \(1, 3, 8, 12\); the model allows one of "
                                        r"\(2, 3, 16, 8\), \(1, 3, 8, 8\), \(1, 3, 4, 12\) \(float16\)$"):
        model.predict({"x": np.zeros((1, 3, 8, 12), np.float32)})


def test_specializations_share_weights_and_drop_least_recent(range_model):
    model = MILModel(range_model, max_shapes=2)
    weights = {id(t) for t in model.plan.env_init if t is not None and t.numel() >= 1024}
    for shape in [(1, 3, 4, 4), (2, 3, 6, 6), (1, 3, 4, 4)]:
        model.predict({"x": np.ones(shape, np.float32)})
        assert weights <= {id(t) for t in model.plan.env_init if t is not None}
    assert list(model._specializations) == [(((2, 3, 6, 6),)), (((1, 3, 4, 4),))]


def test_one_flexible_input_beside_a_fixed_one(tmp_path):
    import coremltools as ct

    inputs = [ct.TensorType(name="x", shape=(2, ct.RangeDim(1, 10, default=3))),
              ct.TensorType(name="bias", shape=(4,))]
    path = _convert(AddBias(), (torch.rand(2, 3), torch.rand(4)), inputs, tmp_path / "m.mlpackage")
    model = MILModel(path)
    assert model.input_description["bias"].allowed is None
    rng = np.random.default_rng(3)
    for n in (1, 10, 3):
        x, b = rng.standard_normal((2, n)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
        out = next(iter(model.predict({"x": x, "bias": b}).values()))
        want = AddBias()(torch.from_numpy(x), torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match=r"input 'bias' has shape \(5,\); expected \(4,\)"):
        model.predict({"x": np.zeros((2, 3), np.float32), "bias": np.zeros(5, np.float32)})
    with pytest.raises(UserError, match=r"missing input 'x' \(shape \(2, 1\.\.10\), default \(2, 3\), dtype float32\)"):
        model.predict({"bias": np.zeros(4, np.float32)})


def test_unet_at_several_resolutions(tmp_path):
    """The flexible-resolution case of issue 18: one SD-style UNet package, several latent sizes."""
    import coremltools as ct
    from test_mil_models import UNet, tiny_unet, unet_inputs
    from python_coreml_sd.metrics import psnr

    module, (sample, timestep, context) = UNet(tiny_unet()), unet_inputs(32)
    shapes = [(2, 4, 8, 8), (2, 4, 16, 8), (2, 4, 8, 24)]
    traced = torch.jit.trace(module.eval(), (sample, timestep, context), check_trace=False)
    path = tmp_path / "unet.mlpackage"
    ct.convert(traced, inputs=[ct.TensorType(name="sample", shape=ct.EnumeratedShapes(shapes, default=shapes[0])),
                               ct.TensorType(name="timestep", shape=timestep.shape),
                               ct.TensorType(name="encoder_hidden_states", shape=context.shape)],
               convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
               minimum_deployment_target=ct.target.macOS13).save(str(path))
    model = MILModel(path)
    for shape in shapes[::-1]:
        x = torch.randn(shape)
        out = next(iter(model.predict({"sample": x.numpy(), "timestep": timestep.numpy(),
                                       "encoder_hidden_states": context.numpy()}).values()))
        with torch.no_grad():
            want = module(x, timestep, context)
        want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
        assert out.shape == shape and psnr(want, out) >= 60, (shape, psnr(want, out))


def test_free_dimension_whose_default_does_not_fit_compiles_at_the_first_call(tmp_path):
    """query's batch is free (default 1; coremltools bounds it at 1..2) but key / value fix it at 2:
    the default shapes are no valid program, so the model loads, and the first call at a fitting
    shape compiles; a shape the program's own checks reject is a UserError."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Placeholder, Program, get_new_symbol, types

    inputs = {"q": Placeholder((get_new_symbol(), 2, 4), dtype=types.fp32),
              "k": Placeholder((2, 5, 4), dtype=types.fp32), "v": Placeholder((2, 5, 4), dtype=types.fp32)}
    with Function(inputs, opset_version=ct.target.iOS18) as func:
        func.set_outputs([mb.scaled_dot_product_attention(query=func.inputs["q"], key=func.inputs["k"],
                                                          value=func.inputs["v"])])
    prog = Program()
    prog.add_function("main", func)
    path = tmp_path / "sdpa.mlpackage"
    ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
               minimum_deployment_target=ct.target.iOS18).save(str(path))
    model = MILModel(path)
    assert model.plan is None and model.input_description["q"].allowed is not None
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 2, 4), (2, 5, 4), (2, 5, 4)))
    out = next(iter(model.predict({"q": q, "k": k, "v": v}).values()))
    want = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(t) for t in (q, k, v))).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="same batch dimension"):
        model.predict({"q": q[:1], "k": k, "v": v})
