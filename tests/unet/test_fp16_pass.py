"""The UNet conversion's shortcuts give what coremltools' own path gives: the fp16 pass (with weights
halved before MIL) builds the same program as coremltools' add_fp16_cast, the trace at a small latent
the same graph, and the brief program strings are put back."""
import logging

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program

from python_coreml_sd.convert.common import input_dtype
from python_coreml_sd import registry
from python_coreml_sd.convert import unet as U
from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.convert.common import brief_program_strings, fresh_op_names, run_passes
from python_coreml_sd.layers import ATTENTION_IMPLEMENTATIONS
from python_coreml_sd.layers.unet import from_diffusers

CONFIG = registry.family("tiny")["architecture"]["unet"]  # the `unets["tiny"]` fixture's


def mil_program(diffusers_unet, implementation: str, halve: bool):
    """The UNet's MIL program after our passes; `halve=False` uses coremltools' add_fp16_cast on fp32
    weights instead of our pass on weights halved before MIL."""
    fresh_op_names()
    options = ConversionOptions("tiny", "/unused", attention_implementation=implementation)
    inputs = U.sample_inputs(CONFIG, 2, 16, 16, 77)
    traced = U.traced_skeleton(CONFIG, implementation, inputs)
    weights = {k: v.clone() for k, v in from_diffusers(diffusers_unet, implementation).state_dict().items()}
    if halve:
        U.halve_large_weights(weights)
    U.assign_weights(traced, weights)
    with U.half_weights_as_constexpr(traced):
        prog = ct.convert(traced, convert_to="milinternal", source="pytorch",
                          inputs=[ct.TensorType(name=k, shape=tuple(v.shape), dtype=input_dtype(k, options))
                                  for k, v in inputs.items()],
                          outputs=[ct.TensorType(name="noise_pred", dtype=np.float32)],
                          compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.macOS13,
                          pass_pipeline=ct.PassPipeline.EMPTY)
    passes = U.unet_passes("float16")
    if not halve:
        passes = ["common::add_fp16_cast" if p == U.STREAMING_FP16_PASS else p for p in passes]
    run_passes(prog, passes)
    return prog


def program_text(prog) -> str:
    # block numbers count the blocks this process has made; everything else must match
    import re
    return re.sub(r"block\d+", "block", str(prog))


def consts(prog) -> dict:
    return {op.outputs[0].name: op.outputs[0].val for op in prog.functions["main"].operations if op.op_type == "const"}


@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
def test_our_fp16_pass_builds_coremltools_program(unets, implementation):
    ours = mil_program(unets["tiny"], implementation, halve=True)
    stock = mil_program(unets["tiny"], implementation, halve=False)
    assert program_text(ours) == program_text(stock)
    ours_consts, stock_consts = consts(ours), consts(stock)
    assert ours_consts.keys() == stock_consts.keys()
    for name, value in stock_consts.items():
        assert np.asarray(ours_consts[name]).dtype == np.asarray(value).dtype, name
        np.testing.assert_array_equal(ours_consts[name], value, err_msg=name)
    assert not [op for op in ours.functions["main"].operations if op.op_type.startswith("constexpr")]


def test_halving_keeps_small_and_out_of_range_weights_in_fp32():
    weights = {"large": torch.randn(U.LARGE_WEIGHT_ELEMENTS), "small": torch.randn(U.LARGE_WEIGHT_ELEMENTS - 1),
               "huge": torch.full((U.LARGE_WEIGHT_ELEMENTS,), 1e5)}
    expected = weights["large"].half()
    U.halve_large_weights(weights)
    assert weights["large"].dtype == torch.float16 and torch.equal(weights["large"], expected)
    assert weights["small"].dtype == torch.float32 and weights["huge"].dtype == torch.float32


def test_without_the_frontend_hook_halved_weights_go_back_to_fp32(monkeypatch):
    """Another coremltools without TorchConverter._add_const: fp16 weights would meet fp32 activations,
    so the traced module's halved weights are made fp32 again (same values) before converting."""
    from coremltools.converters.mil.frontend.torch.converter import TorchConverter

    traced = torch.jit.trace(torch.nn.Conv2d(64, 64, 1).eval(), torch.zeros(1, 64, 2, 2))
    weights = dict(traced.state_dict())
    U.halve_large_weights(weights)
    U.assign_weights(traced, weights)
    halved = weights["weight"].clone()
    monkeypatch.delattr(TorchConverter, "_add_const")
    with U.half_weights_as_constexpr(traced):
        state = traced.state_dict()
    assert state["weight"].dtype == torch.float32 and torch.equal(state["weight"], halved.float())


def test_a_weight_of_an_op_left_in_fp32_becomes_an_fp32_const():
    """An op the fp16 pass leaves in fp32 (here: another input beyond fp16's range) keeps its halved
    weight as an ordinary fp32 const of the same values, not as a constexpr op."""
    size = U.LARGE_WEIGHT_ELEMENTS
    halved = np.linspace(-1, 1, size).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(size,))], opset_version=ct.target.macOS13)
    def prog(x):
        weight = mb.constexpr_cast(source_val=halved, output_dtype="fp32", name="weight")
        kept = mb.add(x=weight, y=np.full(size, 7e4, np.float32), name="kept_fp32")
        return mb.mul(x=kept, y=x)

    run_passes(prog, U.unet_passes("float16"))
    ops = prog.functions["main"].operations
    assert not [op for op in ops if op.op_type.startswith("constexpr")]
    np.testing.assert_array_equal(consts(prog)["weight"], halved.astype(np.float32))
    assert next(op for op in ops if op.op_type == "add").outputs[0].dtype == ct.converters.mil.mil.types.fp32


def test_non_v2_unets_are_traced_at_a_small_latent_v2_at_the_real_one():
    inputs = U.sample_inputs(CONFIG, 2, 64, 48, 77)
    for implementation in ("ORIGINAL", "SPLIT_EINSUM"):
        sample, timestep, context = U.trace_inputs(CONFIG, implementation, inputs)
        assert sample.shape == (1, 4, 8, 8) and timestep.shape == (1,) and context.shape == (1, 32, 1, 77)
    assert U.trace_inputs(CONFIG, "SPLIT_EINSUM_V2", inputs)[0].shape == (1, 4, 64, 48)


def test_brief_program_strings_are_put_back(caplog):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))])
    def prog(x):
        return mb.relu(x=x)

    full = str(prog)
    with brief_program_strings():
        assert str(prog) == "<MIL program: main>"
        assert "relu" not in str(prog.functions["main"])
    assert str(prog) == full and "relu" in full
    with caplog.at_level(logging.DEBUG, logger="coremltools"), brief_program_strings():
        assert str(prog) == full  # debugging coremltools: its messages keep the whole program
    assert Program.__str__ is not None
