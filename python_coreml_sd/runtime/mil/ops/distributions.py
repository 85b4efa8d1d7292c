"""random_bernoulli / random_categorical / random_normal / random_uniform, drawn with torch generators.

Core ML's random streams are not documented, so these outputs match Core ML's only in distribution
(registry.STATISTICAL: never folded at load, checked statistically). A `seed` >= 0 seeds a fresh
generator at every call, so a seeded op gives the same values on every prediction; seed -1 draws
from torch's global generator.
"""
import torch

from .registry import op


def _generator(a):
    seed, device = int(a.scalar("seed", -1)), a.device
    return lambda: None if seed < 0 else torch.Generator(device).manual_seed(seed)


def _sampler(a, draw):
    """draw(shape, generator) -> fp32 tensor; the shape is a constant or a run-time input."""
    gen = _generator(a)
    if a.var("shape").val is None:
        return (lambda s: draw(tuple(int(d) for d in s.tolist()), gen())), [a.var("shape")]
    shape = tuple(a.ints("shape"))
    return (lambda: draw(shape, gen())), []


def _rand(fn, dev):
    return lambda shape, g: fn(shape, generator=g, device=dev, dtype=torch.float32)


@op("random_bernoulli")
def _bernoulli(a):
    prob, rand = a.scalar("prob", 0.5), _rand(torch.rand, a.device)
    return _sampler(a, lambda shape, g: (rand(shape, g) < prob).float())


@op("random_normal")
def _normal(a):
    mean, std, randn = a.scalar("mean", 0.0), a.scalar("stddev", 1.0), _rand(torch.randn, a.device)
    return _sampler(a, lambda shape, g: randn(shape, g) * std + mean)


@op("random_uniform")
def _uniform(a):
    low, high, rand = a.scalar("low", 0.0), a.scalar("high", 1.0), _rand(torch.rand, a.device)
    return _sampler(a, lambda shape, g: rand(shape, g) * (high - low) + low)


@op("random_categorical")
def _categorical(a):
    """Indices (as floats) of `size` draws with replacement from each distribution along the last axis."""
    gen, size, probs = _generator(a), int(a.scalar("size", 1)), a.scalar("mode", "logits") == "probs"

    def fn(x):
        flat = x.float().reshape(-1, x.shape[-1])
        p = flat / flat.sum(-1, keepdim=True) if probs else torch.softmax(flat, -1)
        return torch.multinomial(p, size, replacement=True, generator=gen()).float().reshape(*x.shape[:-1], size)

    return fn, [a.var("x")]
