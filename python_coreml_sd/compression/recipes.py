"""Mixed-bit recipes: reading them, their layer names, and matching them to a converted model's weights.

A recipe is JSON, ``{"layers": {"down_blocks.0.resnets.0.conv1": 4, ...}, ...metadata}`` (or a plain
``{layer: bits}`` object). Bits are one of ``SUPPORTED_NBITS`` or 16 ("keep fp16").

Layer names are canonical: the diffusers UNet's own module paths, as in its ``state_dict`` minus the
``.weight``, with no wrapper prefix. The converter's Neural-Engine UNet keeps those paths for every
attention implementation, so its MIL weight consts are ``<path with dots as underscores>_weight``
plus a cast suffix (``_to_fp16``); a traced wrapper adds its attribute as a prefix (``unet_``).
Recipes written before names were canonical carry a ``unet.`` prefix; it is stripped on reading.

Matching (``match_consts``): a key matches the const whose name, minus the cast suffix, equals
``<key with _>_weight`` or ends with ``_`` + that; the longest key wins; a key may also be a MIL const
name verbatim. A key that matches nothing is an error, so a recipe made for another model fails
loudly. ``check_layer_names`` runs the same matcher on the names a module *will* give its consts, so
the converter rejects a bad recipe before converting anything.
"""
from __future__ import annotations

import json
from pathlib import Path

from python_coreml_sd.compression.kmeans import SUPPORTED_NBITS
from python_coreml_sd.errors import UserError

KEEP_FP16 = 16  # recipe value meaning "leave this layer in fp16"

RECIPE_BITS = SUPPORTED_NBITS + (KEEP_FP16,)
CAST_SUFFIXES = ("_to_fp16", "_to_fp32")
LEGACY_PREFIX = "unet."  # what the analysis of the traced wrapper used to write


def recipe_layers(recipe) -> dict:
    """{canonical layer name: bits} from a recipe file's dict (with "layers") or a plain mapping."""
    layers = recipe.get("layers", recipe) if isinstance(recipe, dict) else None
    if not isinstance(layers, dict) or not layers or not all(isinstance(k, str) for k in layers):
        raise UserError("a mixed-bit recipe is a non-empty JSON object {layer name: bits} (or {\"layers\": {...}})")
    bad = {k: b for k, b in layers.items() if isinstance(b, bool) or b not in RECIPE_BITS}
    if bad:
        name, bits = next(iter(bad.items()))
        raise UserError(f"mixed-bit recipe: {len(bad)} layer(s) with unsupported bits, e.g. {name!r}: {bits!r}; "
                        f"use one of {', '.join(map(str, RECIPE_BITS))} (16 keeps fp16)")
    out = {}
    for key, bits in layers.items():
        name = key.removeprefix(LEGACY_PREFIX)
        if out.get(name, bits) != bits:
            raise UserError(f"mixed-bit recipe gives {name!r} two bit widths ({out[name]} and {bits})")
        out[name] = int(bits)
    return out


def load_recipe(path) -> dict:
    """The layers of a recipe JSON file, validated; UserError if it cannot be read or is malformed."""
    try:
        return recipe_layers(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read mixed-bit recipe {path}: {err}") from err


def match_consts(const_names, layers: dict, where: str = "the model") -> dict:
    """{const name: bits} for the consts the recipe's keys match; UserError for keys matching nothing."""
    out, used, targets = {}, set(), _targets(layers)
    for const in const_names:
        key = _match(const, layers, targets)
        if key is not None:
            out[const] = layers[key]
            used.add(key)
    missing = sorted(set(layers) - used)
    if missing:
        raise UserError(f"mixed-bit recipe names {len(missing)} layer(s) not in {where}, e.g. "
                        f"{', '.join(missing[:3])}; was it made for another model?")
    return out


def module_const_names(module) -> list:
    """The weight const names a traced ``module`` gets for its conv/linear layers (before and after
    the fp16 cast), as the converter will name them."""
    import torch

    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)
    stems = [name.replace(".", "_") + "_weight" for name, m in module.named_modules() if isinstance(m, kinds)]
    return stems + [stem + CAST_SUFFIXES[0] for stem in stems]


def check_layer_names(layers: dict, module, where: str = "the UNet") -> None:
    """UserError unless every recipe key matches a conv/linear layer of ``module`` (which may be on
    the meta device: only its names are read)."""
    match_consts(module_const_names(module), layers, where)


def recipe_to_const_names(const_names: list, recipe) -> dict:
    """{MIL const name: bits} for a recipe (dict or its layers) against a program's const names."""
    return match_consts(const_names, recipe_layers(recipe))


def _targets(layers: dict) -> dict:
    return {key.replace(".", "_") + "_weight": key for key in layers}


def _match(const: str, layers: dict, targets: dict | None = None):
    """The recipe key ``const`` belongs to, or None: the verbatim key, else the longest key whose
    ``<key with _>_weight`` is the whole cast-less name or a suffix of it starting after a ``_``."""
    if const in layers:
        return const
    targets = _targets(layers) if targets is None else targets
    stem = const
    for suffix in CAST_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    starts = [0] + [i + 1 for i, c in enumerate(stem) if c == "_"]
    return next((targets[stem[i:]] for i in starts if stem[i:] in targets), None)
