"""Write the scheduler golden vectors the Swift package's SamplerTests compare against
(swift/Tests/StableDiffusionTests/Resources/schedulers.json), from diffusers' own schedulers.

Each case is a diffusers scheduler_config.json (SD 1.x's settings with a prediction type, timestep
spacing, Karras flag or beta schedule changed), a scheduler kind and a step count; it records the
timesteps, sigmas, init_noise_sigma, and for every step the sample, the scaled model input, the model
output (fixed random values), the noise an ancestral step adds and the next sample. Swift builds the
scheduler from the same JSON and runs each step from the recorded sample (teacher forcing), so the
tolerance is per step. tests/test_scheduler_vectors.py replays the committed file in diffusers.

    python scripts/make_scheduler_vectors.py            # rewrite the committed file
    python scripts/make_scheduler_vectors.py -o out.json
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "schedulers.json"
SHAPE = (1, 4, 2, 2)
# What the converter copies from SD 1.5's scheduler/scheduler_config.json (diffusers 0.42 writes it so).
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}
CLASSES = {"pndm": "PNDMScheduler", "dpmpp": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
           "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler", "lcm": "LCMScheduler",
           "lms": "LMSDiscreteScheduler"}
KINDS = ("euler", "euler_a", "ddim", "dpmpp", "dpmpp_karras", "pndm", "lcm", "lms")
STOCHASTIC = ("euler_a", "lcm")  # their steps draw noise from the generator
SPACINGS = ("linspace", "leading", "trailing")
# Other training schedules, on a few kinds: the config, not constants, decides the betas.
EXTRA_CONFIGS = [
    ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}),
    ("euler_a", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "trailing"}),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": True, "clip_sample": True}),
    ("dpmpp", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("lms", {"use_karras_sigmas": True}),
    ("euler_a", {"use_karras_sigmas": True}),  # diffusers' Euler ancestral ignores it; so must Swift
    ("lcm", {"original_inference_steps": 30, "timestep_scaling": 5.0, "clip_sample": True, "set_alpha_to_one": False}),
]


def f32(value) -> float:
    """A float32 as the shortest decimal that reads back (through double, as JSON readers do) to it."""
    x = np.float32(value)
    shortest = float(str(x))
    assert np.float32(shortest) == x or (np.isnan(x) and np.isnan(shortest)), x
    return shortest


def floats(values) -> list:
    return [f32(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def make(kind: str, config: dict):
    import diffusers
    name = "dpmpp" if kind == "dpmpp_karras" else kind
    return getattr(diffusers, CLASSES[name]).from_config(config)


def case_config(kind: str, prediction: str, spacing: str | None, extra: dict | None = None) -> dict:
    config = dict(SD_CONFIG, prediction_type=prediction)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    if kind == "dpmpp_karras":
        config["use_karras_sigmas"] = True
    config.update(extra or {})
    return config


def run_case(kind: str, config: dict, steps: int, seed: int) -> dict:
    scheduler = make(kind, config)
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    rng = np.random.RandomState(seed)
    init_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    sample = (rng.randn(*SHAPE).astype(np.float32) * np.float32(init_sigma)).astype(np.float32)
    samples, inputs, outputs, noises = [floats(sample)], [], [], []
    for k, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.from_numpy(sample), t)
        inputs.append(floats(model_input.numpy()))
        output = (0.5 * rng.randn(*SHAPE)).astype(np.float32)
        kwargs = {}
        if kind in STOCHASTIC:
            kwargs["generator"] = torch.Generator().manual_seed(seed * 1000 + k)
            noises.append(floats(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed * 1000 + k))))
        sample = scheduler.step(torch.from_numpy(output), t, torch.from_numpy(sample), **kwargs).prev_sample.numpy()
        outputs.append(floats(output))
        samples.append(floats(sample))
    case = {"kind": kind, "config": config, "steps": steps, "seed": seed, "timesteps": timesteps,
            "init_noise_sigma": f32(init_sigma), "model_inputs": inputs, "model_outputs": outputs, "samples": samples}
    if hasattr(scheduler, "sigmas"):
        case["sigmas"] = floats(scheduler.sigmas)
    if noises:
        case["noises"] = noises
    return case


def replay(case: dict) -> list:
    """Each committed step run again in diffusers from the committed sample before it (teacher
    forcing, as the Swift test runs it). Returns (scaled input, next sample) per step as float32."""
    scheduler = make(case["kind"], case["config"])
    scheduler.set_timesteps(case["steps"])
    steps = []
    for k, t in enumerate(scheduler.timesteps):
        sample = torch.tensor(case["samples"][k], dtype=torch.float32).reshape(SHAPE)
        model_input = scheduler.scale_model_input(sample, t).numpy().reshape(-1)
        output = torch.tensor(case["model_outputs"][k], dtype=torch.float32).reshape(SHAPE)
        kwargs = {}
        if "noises" in case:
            kwargs["generator"] = torch.Generator().manual_seed(case["seed"] * 1000 + k)
        steps.append((model_input, scheduler.step(output, t, sample, **kwargs).prev_sample.numpy().reshape(-1)))
    return steps


def build() -> dict:
    cases, seed = [], 1
    for kind in KINDS:
        for spacing in SPACINGS:
            for prediction, step_counts in (("epsilon", (1, 2, 50)), ("v_prediction", (9,))):
                for steps in step_counts:
                    cases.append(run_case(kind, case_config(kind, prediction, spacing), steps, seed))
                    seed += 1
    for kind, extra in EXTRA_CONFIGS:
        cases.append(run_case(kind, case_config(kind, "epsilon", None, extra), 25, seed))
        seed += 1
    import diffusers
    return {"generator": "scripts/make_scheduler_vectors.py", "diffusers": diffusers.__version__,
            "shape": list(SHAPE), "cases": cases}


def dumps(golden: dict) -> str:
    return json.dumps(golden, separators=(",", ":")) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", type=Path, default=OUTPUT, help=f"output file (default: {OUTPUT})")
    args = parser.parse_args()
    text = dumps(build())
    args.o.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode())} bytes to {args.o}")


if __name__ == "__main__":
    main()
