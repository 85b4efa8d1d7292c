"""`--lora FILE[:SCALE]`: LoRA weights merged into the UNet and text encoder before conversion.

Files in diffusers / PEFT format and in kohya's (AUTOMATIC1111's) format are read by diffusers'
`lora_state_dict` (which maps kohya names to diffusers'), attached with diffusers' loaders (SDXL's
second text encoder too) and merged with its `fuse_lora` at the given scale, one LoRA at a time, then
the LoRA layers are removed: what is converted is a plain model with merged weights. diffusers' LoRA loading runs on PEFT only (its
non-PEFT paths are gone), so peft is a dependency (setup.py, constraints.txt).
"""
import logging
import re
from pathlib import Path

from .errors import UserError, first_line

log = logging.getLogger("python_coreml_sd")

COMPONENT_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
# Names of the LoRA tensors of one module, in the formats lora_state_dict returns.
_LORA_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|lora_linear_layer\.down|"
                          r"lora_linear_layer\.up|lora_magnitude_vector)(\.[^.]+)?\.weight$|\.alpha$|\.(lora_A|lora_B)\.bias$")


def read_lora(path: Path, allow_pickle: bool = False) -> dict:
    """The tensors of a LoRA file (safetensors, header checked; a pickle only with --allow-pickle)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise UserError(f"LoRA {path} is not a .safetensors file; pickles are loaded only with --allow-pickle "
                            "(unpickling can run code)")
        from .single_file import _load_pickle
        return _load_pickle(path)[0]
    from .weights import read_safetensors
    return read_safetensors(path)


def lora_state_dict(path: Path, allow_pickle: bool = False, xl: bool = False):
    """(state dict with `unet.` / `text_encoder.` / `text_encoder_2.` prefixes, network alphas) in diffusers'
    naming; `xl`: the model is SDXL (else an SDXL LoRA is refused)."""
    from diffusers import StableDiffusionPipeline

    tensors = read_lora(path, allow_pickle)
    if not tensors:
        raise UserError(f"LoRA {path} holds no tensors")
    if not xl and _is_xl(tensors):
        raise _not_sd(path)
    try:  # one reader for both families: diffusers' SD and SDXL loaders share it (kohya lora_te1_/te2_ included)
        state, alphas = StableDiffusionPipeline.lora_state_dict(tensors)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(f"LoRA {path} is in no format diffusers reads (diffusers/PEFT or kohya): "
                        f"{first_line(exc)}") from None
    if not xl and _is_xl(state):
        raise _not_sd(path)
    return state, alphas


def _is_xl(names) -> bool:
    """Names only SDXL LoRAs have: a second text encoder (kohya's te1 / te2, diffusers' text_encoder_2), the
    UNet's added (text_time) embedding."""
    return any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "add_embedding" in k for k in names)


def _not_sd(path) -> UserError:
    return UserError(f"LoRA {path} is for SDXL (it has a second text encoder or SDXL's added embedding), but the "
                     "model is SD 1.x / 2.x; use an SDXL model, or a LoRA made for this model's family")


def lora_modules(state: dict, component: str) -> set:
    """The module names a LoRA state dict targets in `component`, in PEFT's naming (as diffusers' loaders
    convert them before attaching)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    prefix = COMPONENT_PREFIXES[component]
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        return set()
    own = (convert_unet_state_dict_to_peft(own) if component == "unet"
           else convert_state_dict_to_peft(convert_state_dict_to_diffusers(own)))
    return {_LORA_SUFFIX.sub("", k) for k in own}


def merge_loras(model, component: str, loras: list, model_name: str) -> dict:
    """Merge each (LoraSpec, state, alphas) that has tensors for `component` into `model` in place;
    returns {lora path: (matched, targeted)} module counts. A LoRA whose tensors fit no module, or do
    not fit (other widths or ranks), is a UserError."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora
    from peft.tuners.lora import LoraLayer

    counts = {}
    for index, (spec, state, alphas) in enumerate(loras):
        targeted = lora_modules(state, component)
        if not targeted:
            continue
        name = f"lora{index}"
        try:
            if component == "unet":
                StableDiffusionPipeline.load_lora_into_unet(state, alphas, model, adapter_name=name)
            else:
                StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, model, prefix=component,
                                                                    adapter_name=name)
        except ValueError as exc:
            if "not found in the base model" in str(exc) or "Target modules" in str(exc):
                counts[str(spec.path)] = (0, len(targeted))
                continue
            raise UserError(f"LoRA {spec.path} does not fit the {component} of {model_name!r}: {first_line(exc)}") from None
        except (RuntimeError, KeyError, TypeError) as exc:  # size mismatch: another family or rank
            raise UserError(f"LoRA {spec.path} does not fit the {component} of {model_name!r} (another model family, "
                            f"or ranks that differ): {first_line(exc)}") from None
        matched = sum(1 for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A)
        counts[str(spec.path)] = (matched, len(targeted))
        if component == "unet":
            model.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
            model.unload_lora()
        else:
            fuse_text_encoder_lora(model, lora_scale=spec.scale, adapter_names=[name])
            _remove_text_encoder_monkey_patch(model)
    return counts


def check_counts(specs: list, counts: dict) -> None:
    """One line per LoRA on how many of its modules matched; a UserError for one that matched none."""
    for spec in specs:
        per = {component: c[str(spec.path)] for component, c in counts.items() if str(spec.path) in c}
        matched = sum(m for m, _ in per.values())
        targeted = sum(t for _, t in per.values())
        summary = ", ".join(f"{component} {m} of {t}" for component, (m, t) in per.items())
        if matched == 0:
            raise UserError(f"LoRA {spec.path}: none of its {targeted} modules matches the model "
                            f"({summary or 'no unet or text encoder tensors'}); is it for another model family?")
        log.warning("LoRA %s (scale %g): %d of %d modules matched (%s)", spec.path, spec.scale, matched, targeted,
                    summary)
