"""The model registry (`models/registry.json`): supported families and named models."""
import copy
import json
from functools import lru_cache
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
TOKENIZER_DIR = MODELS_DIR / "tokenizer"


@lru_cache(maxsize=None)
def _registry() -> dict:
    return json.loads((MODELS_DIR / "registry.json").read_text())


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def family(name: str) -> dict:
    """A family's description, prediction type and architecture, with `inherits` resolved."""
    families = _registry()["families"]
    if name not in families:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}")
    entry = families[name]
    if "inherits" in entry:
        entry = _deep_merge(family(entry["inherits"]), {k: v for k, v in entry.items() if k != "inherits"})
    return copy.deepcopy(entry)


def named_model(name: str):
    """The registry entry of a named model, or None."""
    entry = _registry()["models"].get(name)
    return copy.deepcopy(entry) if entry else None


def named_controlnet(name: str):
    """The registry entry of a named ControlNet (`controlnets`: the embedded tiny-controlnet), or None."""
    entry = _registry().get("controlnets", {}).get(name)
    return copy.deepcopy(entry) if entry else None


# Generation defaults: diffusers' StableDiffusionPipeline and Apple's CLI, unless a family says otherwise (SDXL-Turbo,
# distilled for 1-4 steps without guidance, samples with its own Euler-ancestral scheduler; PNDM needs more steps).
GENERATION_DEFAULTS = {"guidance_scale": 7.5, "scheduler": "PNDM"}


def generation_default(model_version: str, key: str):
    """What a named model generates with unless told: its family's `generation` entry, else the defaults."""
    entry = named_model(model_version) if model_version else None
    own = family(entry["family"]).get("generation", {}) if entry else {}
    return own.get(key, GENERATION_DEFAULTS[key])


def controlnet_names() -> list:
    return sorted(_registry().get("controlnets", {}))


def model_names() -> list:
    return sorted(_registry()["models"])


def scheduler_config() -> dict:
    return copy.deepcopy(_registry()["scheduler"])
