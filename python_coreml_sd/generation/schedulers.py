"""Scheduler choice by name; the schedulers themselves are diffusers'."""
from ..errors import UserError

SCHEDULERS = {
    "PNDM": "PNDMScheduler",
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "EulerDiscrete": "EulerDiscreteScheduler",
    "EulerAncestralDiscrete": "EulerAncestralDiscreteScheduler",
    "LMSDiscrete": "LMSDiscreteScheduler",
}


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler of `name` built from a model's scheduler config."""
    import diffusers
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)
