"""Recurrent ops: rnn, gru, lstm (MIL iOS15 semantics, fp16 from iOS17, gru's iOS18 reset_after /
input_bias).

Layout facts the MIL reference and coremltools' expected values fix:
- x is (seq, batch, input); states are (batch, H) ((batch, 2H) for a bidirectional lstm).
- gate order: gru [r, o, z] ("o" = the candidate state), lstm [i, f, o, z] (z = the cell gate);
  lstm peepholes [i, f, o], i and f read c_{t-1}, o reads the new c_t.
- direction "reverse" runs over the reversed sequence and emits the outputs in that (processing)
  order; a bidirectional lstm emits the backward outputs aligned with the input steps (PyTorch's
  layout), and its last-step output is [forward at the last step, backward at step 0].
- gru without reset_after multiplies r into h before the recurrent weights: R_o (r * h); with
  reset_after (iOS18) it multiplies the product: r * (R_o h + b_ho), PyTorch's GRU.
- activations take their default parameters: scaled_tanh = tanh, hard_sigmoid = clip(0.2 x + 0.5),
  linear = x; lstm `clip` bounds the cell state.
Every step computes in fp32; outputs are cast to the declared dtype.
"""
import torch

from .registry import op

_ACTIVATIONS = {
    "tanh": torch.tanh,
    "scaled_tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": lambda x: torch.clamp(0.2 * x + 0.5, 0.0, 1.0),
    "sigmoid_hard": lambda x: torch.clamp(0.2 * x + 0.5, 0.0, 1.0),
    "relu": torch.relu,
    "linear": lambda x: x,
}


def _activation(a, name, default):
    key = str(a.const(name, default)).lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"activation {key!r} is not one the MIL reference defines")
    return _ACTIVATIONS[key]


def _weights(a, *names):
    """fp32 device copies of const inputs (None for the absent optional ones)."""
    out = []
    for name in names:
        val = a.const(name, None)
        out.append(None if val is None else a.tensor(val, "fp32").float())
    return out


def _projected(x, w_ih, bias):
    """W_ih x_t (+ bias) for every step at once: (seq, batch, gates*H)."""
    y = torch.matmul(x.float(), w_ih.t())
    return y if bias is None else y + bias


def _outputs(a):
    """finish(seq, last, states) -> (output sequence or last step, final states...) in the op's
    declared dtype."""
    full, dt = bool(a.const("output_sequence", False)), a.out_torch_dtype()

    def finish(seq, last, states):
        y = seq if full else last.unsqueeze(0)
        return (y.to(dt), *(s.to(dt) for s in states))

    return finish


def _steps(n, reverse):
    return range(n - 1, -1, -1) if reverse else range(n)


@op("rnn")
def rnn(a):
    w_ih, w_hh, bias = _weights(a, "weight_ih", "weight_hh", "bias")
    act, reverse = _activation(a, "activation", "tanh"), a.const("direction", "forward") == "reverse"
    finish = _outputs(a)

    def fn(x, h0):
        xs, h, seq = _projected(x, w_ih, bias), h0.float(), []
        for t in _steps(xs.shape[0], reverse):
            h = act(xs[t] + h @ w_hh.t())
            seq.append(h)
        return finish(torch.stack(seq), h, [h])

    return fn, [a.var("x"), a.var("initial_h")]


@op("gru")
def gru(a):
    w_ih, w_hh, bias, input_bias = _weights(a, "weight_ih", "weight_hh", "bias", "input_bias")
    rec, act = _activation(a, "recurrent_activation", "sigmoid"), _activation(a, "activation", "tanh")
    reverse, after = a.const("direction", "forward") == "reverse", bool(a.const("reset_after", False))
    finish = _outputs(a)
    hidden = w_hh.shape[1]
    r_hh, o_hh, z_hh = w_hh.split(hidden)
    zeros = torch.zeros(3 * hidden, device=w_hh.device)
    if after:  # input_bias on the input side, bias on the recurrent side (inside r * (...))
        b_in, b_rec = input_bias, zeros if bias is None else bias
    else:  # both biases add outside the reset gate: all on the input side
        present = [b for b in (bias, input_bias) if b is not None]
        b_in, b_rec = (sum(present) if present else None), zeros
    b_r, b_o, b_z = b_rec.split(hidden)

    def fn(x, h0):
        xs, h, seq = _projected(x, w_ih, b_in), h0.float(), []
        for t in _steps(xs.shape[0], reverse):
            x_r, x_o, x_z = xs[t].split(hidden, dim=-1)
            r = rec(x_r + h @ r_hh.t() + b_r)
            z = rec(x_z + h @ z_hh.t() + b_z)
            o = act(x_o + r * (h @ o_hh.t() + b_o)) if after else act(x_o + (r * h) @ o_hh.t())
            h = (1 - z) * o + z * h
            seq.append(h)
        return finish(torch.stack(seq), h, [h])

    return fn, [a.var("x"), a.var("initial_h")]


def _lstm_direction(a, suffix, hidden):
    w_ih, w_hh, bias, peep = _weights(a, f"weight_ih{suffix}", f"weight_hh{suffix}", f"bias{suffix}",
                                      f"peephole{suffix}")
    if peep is None:
        peep = torch.zeros(3 * hidden, device=w_hh.device)
    return w_ih, w_hh, bias, peep.split(hidden)


@op("lstm")
def lstm(a):
    direction = a.const("direction", "forward")
    rec, cell = _activation(a, "recurrent_activation", "sigmoid"), _activation(a, "cell_activation", "tanh")
    act, clip = _activation(a, "activation", "tanh"), a.const("clip", None)
    finish = _outputs(a)
    hidden = int(a.var("weight_hh").shape[1])
    fwd = _lstm_direction(a, "", hidden)
    back = _lstm_direction(a, "_back", hidden) if direction == "bidirectional" else None
    a.covers("weight_ih_back", "weight_hh_back", "bias_back", "peephole_back")

    def run(x, h, c, weights, reverse):
        w_ih, w_hh, bias, (p_i, p_f, p_o) = weights
        xs, seq = _projected(x, w_ih, bias), []
        for t in _steps(xs.shape[0], reverse):
            g_i, g_f, g_o, g_z = (xs[t] + h @ w_hh.t()).split(hidden, dim=-1)
            i, f = rec(g_i + c * p_i), rec(g_f + c * p_f)
            c = f * c + i * cell(g_z)
            if clip is not None:
                c = c.clamp(-float(clip), float(clip))
            h = rec(g_o + c * p_o) * act(c)
            seq.append(h)
        return torch.stack(seq), h, c

    def fn(x, h0, c0):
        h0, c0 = h0.float(), c0.float()
        if back is None:
            seq, h, c = run(x, h0, c0, fwd, direction == "reverse")
            return finish(seq, h, [h, c])
        seq_f, h_f, c_f = run(x, h0[:, :hidden], c0[:, :hidden], fwd, False)
        seq_b, h_b, c_b = run(x, h0[:, hidden:], c0[:, hidden:], back, True)
        seq = torch.cat([seq_f, seq_b.flip(0)], dim=-1)  # backward outputs back at their input steps
        h, c = torch.cat([h_f, h_b], -1), torch.cat([c_f, c_b], -1)
        return finish(seq, h, [h, c])

    return fn, [a.var("x"), a.var("initial_h"), a.var("initial_c")]
