"""swift/.../schedulers.json (the Swift SamplerTests' golden vectors) still matches diffusers.

scripts/make_scheduler_vectors.py writes it; here every committed step is run again in diffusers from
the committed sample before it (teacher forcing, as the Swift test runs it), so a diffusers change in
any scheduler's timesteps, sigmas or step shows up here before it shows up as a Swift failure.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tests import support

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "schedulers.json"
ULP = float(np.finfo(np.float32).eps)
# As tests/test_golden_vectors.py: about ten float32 roundings per step, each half an ulp of the
# step's largest value; another CPU's kernels may round some of them the other way.
STEP_ULPS = 8


def load_script():
    return support.load_script("make_scheduler_vectors")


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def committed():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def within_ulps(actual, expected, ulps=STEP_ULPS) -> bool:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return a.shape == e.shape and float(np.abs(a - e).max(initial=0)) <= ulps * ULP * max(float(np.abs(e).max(initial=0)), 1e-30)


def test_every_committed_step_matches_diffusers(script, committed):
    for i, case in enumerate(committed["cases"]):
        label = f"cases[{i}] {case['kind']} {case['steps']} steps {case['config']['timestep_spacing']}"
        scheduler = script.make(case["kind"], case["config"])
        scheduler.set_timesteps(case["steps"])
        # Karras sigmas give fractional timesteps through np.log, which numpy dispatches to SIMD kernels by CPU
        # (this AVX-512 machine: one ulp from the committed 106.41719818 at cases[100]); integers stay exact
        assert within_ulps(np.asarray(scheduler.timesteps, np.float64), case["timesteps"], ulps=2), label
        if "sigmas" in case:
            assert within_ulps(scheduler.sigmas.numpy(), case["sigmas"]), label
        for k, (model_input, step) in enumerate(script.replay(case)):
            assert within_ulps(model_input, case["model_inputs"][k]), f"{label} input {k}"
            assert within_ulps(step, case["samples"][k + 1]), f"{label} step {k}; run `python scripts/make_scheduler_vectors.py`"


def test_cases_cover_every_kind_spacing_and_prediction(committed):
    assert GOLDEN.stat().st_size < 1_500_000
    covered = {(c["kind"], c["config"]["timestep_spacing"], c["config"]["prediction_type"]) for c in committed["cases"]}
    assert len(covered) == 8 * 3 * 2
    assert {c["steps"] for c in committed["cases"]} >= {1, 2, 50}
    assert all(len(c["noises"]) == c["steps"] for c in committed["cases"] if c["kind"] in ("euler_a", "lcm"))
    fractional = [t for c in committed["cases"] if c["kind"] == "euler" for t in c["timesteps"] if t != int(t)]
    assert fractional  # linspace spacing gives Euler non-integer timesteps, which Swift must reproduce


def test_noise_fed_to_ancestral_steps_is_what_diffusers_draws(script, committed):
    """The committed noise is the generator's draw: without it the step differs, with it it matches."""
    import torch
    case = next(c for c in committed["cases"] if c["kind"] == "euler_a" and c["steps"] == 50)
    scheduler = script.make(case["kind"], case["config"])
    scheduler.set_timesteps(case["steps"])
    t = scheduler.timesteps[0]
    sample = torch.tensor(case["samples"][0]).reshape(script.SHAPE)
    output = torch.tensor(case["model_outputs"][0]).reshape(script.SHAPE)
    scheduler.scale_model_input(sample, t)
    state = scheduler._step_index
    drawn = torch.randn(script.SHAPE, generator=torch.Generator().manual_seed(case["seed"] * 1000))
    np.testing.assert_array_equal(drawn.numpy().reshape(-1), np.float32(case["noises"][0]))
    step = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(case["seed"] * 1000)).prev_sample
    assert within_ulps(step.numpy().reshape(-1), case["samples"][1])
    scheduler._step_index = state
    other = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    assert not within_ulps(other.numpy().reshape(-1), case["samples"][1])
