"""Stateful models (iOS18 ct.StateType; read_state / coreml_update_state): a torch module with a
registered buffer converted by coremltools, its state carried across predict calls."""
import numpy as np
import pytest
import torch

from python_coreml_sd.errors import UserError
from python_coreml_sd.runtime.mil import MILModel


class Accumulator(torch.nn.Module):
    """A KV-cache-like buffer: each call adds x into row 0, halves the buffer and returns it
    times a weight."""

    def __init__(self):
        super().__init__()
        self.register_buffer("acc", torch.zeros(2, 3))
        self.weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0, 0.5]]))

    def forward(self, x):
        self.acc[0:1, :] += x  # an in-place slice update of the state
        self.acc.mul_(0.5)
        return self.acc * self.weight


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    import coremltools as ct

    traced = torch.jit.trace(Accumulator().eval(), (torch.zeros(1, 3),))
    path = tmp_path_factory.mktemp("state") / "acc.mlpackage"
    ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 3))],
               states=[ct.StateType(wrapped_type=ct.TensorType(shape=(2, 3), dtype=np.float16), name="acc")],
               convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
               compute_precision=ct.precision.FLOAT16).save(str(path))  # states are fp16 only
    return path


def test_state_carries_across_calls_like_the_torch_buffer(stateful):
    model = MILModel(stateful)
    assert set(model.state_description) == {"acc"} and set(model.input_description) == {"x"}
    assert "coreml_update_state" in model.op_types
    reference, state = Accumulator().eval(), model.make_state()
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.standard_normal((1, 3)).astype(np.float32)
        out = next(iter(model.predict({"x": x}, state=state).values()))
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, want, rtol=2e-3, atol=2e-3)  # fp16 program
    np.testing.assert_allclose(state.read_state("acc"), reference.acc.numpy(), rtol=2e-3, atol=2e-3)


def test_two_states_are_independent_and_writable(stateful):
    model = MILModel(stateful)
    a, b = model.make_state(), model.make_state()
    x = np.ones((1, 3), np.float32)
    model.predict({"x": x}, state=a)
    np.testing.assert_array_equal(b.read_state("acc"), np.zeros((2, 3)))
    b.write_state("acc", np.full((2, 3), 4.0, np.float32))
    out = next(iter(model.predict({"x": x}, state=b).values()))
    np.testing.assert_allclose(out, np.array([[2.5, 2.5, 2.5], [2.0, 2.0, 2.0]]) * [[1.0, -2.0, 0.5]])


def test_stateful_model_needs_a_state(stateful):
    model = MILModel(stateful)
    with pytest.raises(UserError, match=r"the model is stateful \(states \['acc'\]\); pass state=model.make_state\(\)"):
        model.predict({"x": np.ones((1, 3), np.float32)})
    with pytest.raises(UserError, match=r"state 'acc' has shape \(2, 3\); got \(3,\)"):
        model.make_state().write_state("acc", np.zeros(3))
