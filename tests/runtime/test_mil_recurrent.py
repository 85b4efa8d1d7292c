"""rnn, gru, lstm: torch's recurrent modules converted by coremltools (its torch frontend emits
lstm / rnn ops, and a while_loop for GRU), and MIL programs for the attributes torch does not
have (reverse direction, peepholes, clip, other activations, iOS18 gru reset_after), against
torch and a numpy loop written from the MIL reference's equations."""
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from mil_test_utils import run_mil
from python_coreml_sd.runtime.mil import MILModel


def _convert(module, x, path):
    import coremltools as ct

    traced = torch.jit.trace(module.eval(), (x,))
    ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram",
               compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16).save(str(path))
    return MILModel(path)


@pytest.mark.parametrize("kind, op_type", [("lstm", "lstm"), ("bilstm", "lstm"), ("rnn", "rnn"), ("gru", "while_loop")])
def test_torch_recurrent_modules(tmp_path, kind, op_type):
    torch.manual_seed(0)
    module = {"lstm": lambda: torch.nn.LSTM(4, 5), "bilstm": lambda: torch.nn.LSTM(4, 5, bidirectional=True),
              "rnn": lambda: torch.nn.RNN(4, 5), "gru": lambda: torch.nn.GRU(4, 5)}[kind]()
    x = torch.randn(7, 3, 4)
    model = _convert(module, x, tmp_path / f"{kind}.mlpackage")
    assert op_type in model.op_types
    outs = model.predict({"x": x.numpy()})
    with torch.no_grad():
        seq = module(x)[0].numpy()
    got = [v for v in outs.values() if v.shape == seq.shape]
    assert got, {k: v.shape for k, v in outs.items()}
    np.testing.assert_allclose(got[0], seq, rtol=1e-5, atol=1e-5)


ACTS = {"tanh": np.tanh, "scaled_tanh": np.tanh, "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
        "hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0, 1), "relu": lambda v: np.maximum(v, 0),
        "linear": lambda v: v}


def _lstm_numpy(x, h, c, w_ih, w_hh, b, p, acts, clip, reverse):
    rec, cell, out_act = (ACTS[n] for n in acts)
    p_i, p_f, p_o = np.split(p, 3)
    seq = []
    for t in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        g_i, g_f, g_o, g_z = np.split(x[t] @ w_ih.T + h @ w_hh.T + b, 4, axis=-1)
        i, f = rec(g_i + c * p_i), rec(g_f + c * p_f)
        c = np.clip(f * c + i * cell(g_z), -clip, clip)
        h = rec(g_o + c * p_o) * out_act(c)
        seq.append(h)
    return np.stack(seq), h, c


@pytest.mark.parametrize("acts, reverse", [(("sigmoid", "tanh", "tanh"), True),
                                           (("hard_sigmoid", "relu", "linear"), False),
                                           (("sigmoid", "scaled_tanh", "sigmoid"), True)])
def test_lstm_peephole_clip_activations_direction(tmp_path, acts, reverse):
    rng = np.random.default_rng(1)
    s, b, i, hs = 5, 2, 3, 4
    w_ih, w_hh = rng.standard_normal((4 * hs, i)).astype(np.float32), rng.standard_normal((4 * hs, hs)).astype(np.float32)
    bias, peep = rng.standard_normal(4 * hs).astype(np.float32), rng.standard_normal(3 * hs).astype(np.float32)
    x, h0, c0 = (rng.standard_normal(shape).astype(np.float32) for shape in ((s, b, i), (b, hs), (b, hs)))

    def build(x, h0, c0):
        return mb.lstm(x=x, initial_h=h0, initial_c=c0, weight_ih=w_ih, weight_hh=w_hh, bias=bias, peephole=peep,
                       direction="reverse" if reverse else "forward", output_sequence=True,
                       recurrent_activation=acts[0], cell_activation=acts[1], activation=acts[2], clip=np.float32(1.5))

    got = run_mil(build, {"x": x, "h0": h0, "c0": c0}, tmp_path)
    want = _lstm_numpy(x, h0, c0, w_ih, w_hh, bias, peep, acts, 1.5, reverse)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_sequence", [True, False])
def test_rnn_reverse_relu(tmp_path, output_sequence):
    rng = np.random.default_rng(2)
    w_ih, w_hh, bias = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((4, 3), (4, 4), (4,)))
    x, h0 = rng.standard_normal((6, 2, 3)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)

    def build(x, h0):
        return mb.rnn(x=x, initial_h=h0, weight_ih=w_ih, weight_hh=w_hh, bias=bias, direction="reverse",
                      output_sequence=output_sequence, activation="relu")

    y, h = run_mil(build, {"x": x, "h0": h0}, tmp_path)
    hh, seq = h0, []
    for t in range(5, -1, -1):  # outputs in processing order
        hh = np.maximum(x[t] @ w_ih.T + hh @ w_hh.T + bias, 0)
        seq.append(hh)
    np.testing.assert_allclose(y, np.stack(seq) if output_sequence else hh[None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, hh, rtol=1e-5, atol=1e-5)


def test_gru_reset_before_the_recurrent_weights(tmp_path):
    """iOS15 gru: o = act(W_o x + R_o (r * h) + b_o), gates in [r, o, z] order."""
    rng = np.random.default_rng(3)
    hs = 4
    w_ih, w_hh, bias = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((3 * hs, 3), (3 * hs, hs), (3 * hs,)))
    x, h0 = rng.standard_normal((5, 2, 3)).astype(np.float32), rng.standard_normal((2, hs)).astype(np.float32)

    def build(x, h0):
        return mb.gru(x=x, initial_h=h0, weight_ih=w_ih, weight_hh=w_hh, bias=bias, output_sequence=True)

    y, h = run_mil(build, {"x": x, "h0": h0}, tmp_path, target="iOS16")
    sig = ACTS["sigmoid"]
    (w_r, w_o, w_z), (r_r, r_o, r_z), (b_r, b_o, b_z) = (np.split(m, 3) for m in (w_ih, w_hh, bias))
    hh, seq = h0, []
    for t in range(5):
        z = sig(x[t] @ w_z.T + hh @ r_z.T + b_z)
        r = sig(x[t] @ w_r.T + hh @ r_r.T + b_r)
        o = np.tanh(x[t] @ w_o.T + (r * hh) @ r_o.T + b_o)
        hh = (1 - z) * o + z * hh
        seq.append(hh)
    np.testing.assert_allclose(y, np.stack(seq), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, hh, rtol=1e-5, atol=1e-5)


def test_gru_reset_after_matches_torch(tmp_path):
    """iOS18 gru(reset_after=True, input_bias=...) is PyTorch's GRU, weights reordered to [r, o, z]."""
    torch.manual_seed(4)
    module = torch.nn.GRU(3, 4)
    x, h0 = torch.randn(6, 2, 3), torch.randn(1, 2, 4)
    sd = module.state_dict()

    def reorder(t):  # torch's gate order [r, z, n] -> MIL's [r, o (= n), z]
        r, z, n = np.split(t.detach().numpy(), 3)
        return np.concatenate([r, n, z])

    def build(x, h0):
        return mb.gru(x=x, initial_h=h0, weight_ih=reorder(sd["weight_ih_l0"]), weight_hh=reorder(sd["weight_hh_l0"]),
                      input_bias=reorder(sd["bias_ih_l0"]), bias=reorder(sd["bias_hh_l0"]), reset_after=True,
                      output_sequence=True)

    y, h = run_mil(build, {"x": x.numpy(), "h0": h0[0].numpy()}, tmp_path, target="iOS18")
    with torch.no_grad():
        want_y, want_h = module(x, h0)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, want_h[0].numpy(), rtol=1e-5, atol=1e-5)
