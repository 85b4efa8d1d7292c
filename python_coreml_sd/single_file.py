"""Single-file checkpoints (`--model-version FILE.safetensors`, `.ckpt` with `--allow-pickle`).

The family is recognised from tensor names (which text encoder layout, SDXL's conditioner embedders),
the architecture comes from the registry (the family whose every tensor shape matches, tried on the
meta device from the header alone: nothing is read to recognise a file), and the weights are mapped to
diffusers' layout by diffusers' own single-file conversion functions (diffusers.loaders.single_file_utils)
with our local configs, never a download. The result is a diffusers folder in the cache, keyed by the
file's sha256, which every converter reads like any other model folder. Component by component, only
that component's tensors are in memory.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import registry
from .components import MODEL_CLASSES, TOKENIZER, new_model
from .errors import UserError, first_line

log = logging.getLogger("python_coreml_sd")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 in open_clip's layout
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L/14 (transformers' layout)
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG/14 (open_clip's layout)
XL_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP ViT-bigG/14 alone
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# Tensors a checkpoint may hold that the diffusers models do not have (buffers, OpenCLIP's projection).
IGNORED_TEXT_KEYS = ("position_ids", "text_projection.weight", "logit_scale")


@dataclass(frozen=True)
class TextLayout:
    """One text encoder of a checkpoint: its diffusers folder, its layout ("clip": transformers' names,
    "open_clip": open_clip's fused in_proj / resblocks) and the prefix of its tensors."""
    folder: str
    layout: str
    prefix: str


@dataclass(frozen=True)
class Kind:
    """A checkpoint layout: how its text encoders are stored, and the registry families it may be."""
    name: str
    texts: tuple = ()  # TextLayouts, one per text encoder
    families: tuple = ()  # registry families to try, the preferred first (equal shapes: the first wins)
    unsupported: str = None  # why it is refused


KINDS = (
    # SDXL base and Turbo have the same tensors: a base-architecture file is taken as SDXL base 1.0.
    Kind("sdxl-base", (TextLayout("text_encoder", "clip", XL_CLIP_PREFIX),
                       TextLayout("text_encoder_2", "open_clip", XL_OPEN_CLIP_PREFIX)), ("sdxl", "tiny-xl")),
    Kind("sdxl-refiner", (TextLayout("text_encoder_2", "open_clip", XL_REFINER_PREFIX),),
         ("sdxl-refiner", "tiny-xl-refiner")),
    Kind("sd1", (TextLayout("text_encoder", "clip", CLIP_PREFIX),), ("sd1", "tiny")),
    # SD 2.x base and 768-v have the same tensors: `prediction_type` below chooses between them.
    Kind("sd2", (TextLayout("text_encoder", "open_clip", OPEN_CLIP_PREFIX),), ("sd2-v", "sd2-base", "tiny-sd2")),
)


def checkpoint_kind(keys) -> Kind:
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    by_name = {kind.name: kind for kind in KINDS}
    if has("conditioner.embedders.1.") or has(XL_CLIP_PREFIX):
        return by_name["sdxl-base"]  # two text encoders: CLIP ViT-L (embedders.0) and OpenCLIP bigG (embedders.1)
    if has(XL_REFINER_PREFIX):
        return by_name["sdxl-refiner"]  # OpenCLIP bigG alone
    if has(UNET_PREFIX):
        if has(CLIP_PREFIX):
            return by_name["sd1"]
        if has(OPEN_CLIP_PREFIX):
            return by_name["sd2"]
    return None


@dataclass
class Recognised:
    kind: Kind
    family: str
    variant: str  # "" or "inpainting"
    architecture: dict = field(repr=False, default=None)
    components: tuple = ()  # diffusers components the file holds
    prediction_type: str = None  # the scheduler's: the family's unless chosen (`prediction_type`)


PREDICTION_TYPES = ("epsilon", "v_prediction")
PREDICTION_HELP = ("a single-file checkpoint's UNet predicts this (SD 2.x base: epsilon, 768-v: v_prediction; the "
                   "tensors cannot tell); default: as diffusers decides, v_prediction for SD 2.x files except inpainting "
                   "ones and the SD 2 base's .ckpt (epsilon), the family's for others")
SD2_BASE_GLOBAL_STEP = 875000  # the training step stored in Stability's SD 2.0 base .ckpt (diffusers' heuristic)


def prediction_type(kind: Kind, variant: str, asked: str = None, global_step: int = None):
    """What the UNet predicts, where the tensors cannot tell: SD 2.x base (epsilon) and 768-v (v_prediction) have
    the same shapes. `asked` (--prediction-type) wins; else as diffusers' single-file loader decides: inpainting
    files are epsilon (SD 2 inpainting was trained from the 512 base), a .ckpt at the SD 2 base's global step
    875000 is the base, any other SD 2.x file 768-v, the more common (2.0 / 2.1). None: the family's own."""
    if asked:
        return asked
    if kind.name == "sd2" and (variant == "inpainting" or global_step == SD2_BASE_GLOBAL_STEP):
        return "epsilon"
    return None


def _meta_checkpoint(entries: dict) -> dict:
    import torch

    from .weights import DTYPES
    return {name: torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]], device="meta")
            for name, entry in entries.items()}


def recognise(path: Path, entries: dict, asked_prediction: str = None, global_step: int = None) -> Recognised:
    """Family, variant and architecture of a checkpoint from its tensor names and shapes (no data read); of the
    families whose shapes match, one of the chosen prediction type (`prediction_type`) is preferred."""
    kind = checkpoint_kind(entries)
    if kind is None:
        raise UserError(f"{path}: unknown model family (no Stable Diffusion UNet and text encoder tensors: "
                        f"{_sample_keys(entries)}); supported single files: SD 1.x, SD 2.x (base, 768-v, inpainting), "
                        "SDXL base and refiner checkpoints in the original (CompVis / Stability) layout")
    meta = _meta_checkpoint(entries)
    conv_in = entries.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = conv_in["shape"][1] if conv_in and len(conv_in["shape"]) == 4 else None
    variant = "inpainting" if in_channels == 9 else ""
    has_vae = any(k.startswith(VAE_PREFIXES) for k in entries)
    components = ("unet",) + tuple(text.folder for text in kind.texts) + (("vae",) if has_vae else ())
    wanted = prediction_type(kind, variant, asked_prediction, global_step)
    tried = []
    for name in sorted(kind.families, key=lambda name: bool(wanted) and registry.family(name)["prediction_type"] != wanted):
        arch = registry.family(name)["architecture"]
        if in_channels:
            arch["unet"]["in_channels"] = in_channels
        jobs = converters(kind, arch)
        mismatch = next((m for m in (_mismatch(c, jobs[c][1](meta), _meta_model(c, arch)) for c in components) if m),
                        "")
        if not mismatch:
            return Recognised(kind, name, variant, arch, components, wanted or registry.family(name)["prediction_type"])
        tried.append(f"{name} ({mismatch})")
    raise UserError(f"{path}: a {kind.name} checkpoint whose shapes match no known architecture; tried "
                    + "; ".join(tried))


def converters(kind: Kind, arch: dict) -> dict:
    """component -> (which checkpoint tensors it reads, checkpoint -> its diffusers state dict)."""
    from diffusers.loaders import single_file_utils as sfu
    jobs = {"unet": (lambda name: name.startswith(UNET_PREFIX),
                     lambda ck: sfu.convert_ldm_unet_checkpoint(ck, arch["unet"])),
            "vae": (lambda name: name.startswith(VAE_PREFIXES),
                    lambda ck: sfu.convert_ldm_vae_checkpoint(ck, arch["vae"]))}
    for text in kind.texts:
        jobs[text.folder] = (lambda name, text=text: name.startswith(text.prefix),
                             lambda ck, text=text: _convert_text(ck, text, arch))
    return jobs


def _sample_keys(entries) -> str:
    names = sorted(entries)[:3]
    return ", ".join(names) + (", ..." if len(entries) > 3 else "") if names else "no tensors"


def _mismatch(component: str, converted: dict, model) -> str:
    """'' when `converted` fills `model` exactly, else what differs (first few)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} {component} tensors missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    if wrong:
        parts.append(f"{len(wrong)} of other shapes, e.g. {wrong[0]} {got[wrong[0]]} vs {expected[wrong[0]]}")
    return ", ".join(parts)


def _meta_model(component: str, arch: dict):
    """The component's model (its class from the component table's MODEL_CLASSES) on the meta device."""
    import torch
    with torch.device("meta"):
        return new_model(component, arch)


def _convert_text(checkpoint: dict, text: TextLayout, arch: dict) -> dict:
    from diffusers.loaders import single_file_utils as sfu
    model = _meta_model(text.folder, arch)
    if text.layout == "clip":
        converted = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=text.prefix)
    else:
        converted = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=text.prefix)
    if not hasattr(model, "text_model"):
        # transformers 5 CLIPTextModel has no `text_model.` level (diffusers strips it the same way);
        # CLIPTextModelWithProjection (SDXL's second encoder) still has it.
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    expected = model.state_dict()
    return {k: v for k, v in converted.items() if k in expected or not k.endswith(IGNORED_TEXT_KEYS)}


# ---- reading


def check_suffix(path: Path, allow_pickle: bool) -> None:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise UserError(f"{path} is a file but not a checkpoint (.safetensors, or .ckpt with --allow-pickle); "
                        "pass a checkpoint file or a diffusers folder")
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(f"{path} is a pickled checkpoint, which is not loaded without --allow-pickle (unpickling "
                        "can run code); pass --allow-pickle for a file you trust, or convert it to .safetensors")


def read_entries(path: Path, allow_pickle: bool):
    """(name -> {dtype, shape} entries, loader(keep) -> tensors, the .ckpt's global_step or None) of a checkpoint."""
    check_suffix(path, allow_pickle)
    if path.suffix == ".safetensors":
        from .weights import read_header, read_safetensors
        entries = read_header(path)["entries"]
        return entries, lambda keep: read_safetensors(path, keep=keep), None
    state, global_step = _load_pickle(path)
    from .weights import DTYPES
    names = {dtype: name for name, dtype in DTYPES.items()}
    entries = {k: {"dtype": names.get(v.dtype, "F32"), "shape": list(v.shape)} for k, v in state.items()}
    return entries, lambda keep: {k: v for k, v in state.items() if keep(k)}, global_step


def _load_pickle(path: Path) -> tuple:
    """(tensors, global_step or None): torch.load in weights_only mode (tensors and plain containers only, even
    with --allow-pickle)."""
    import pickle

    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, OSError, EOFError) as exc:
            raise _unloadable(path, exc) from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError) as exc:
        raise _unloadable(path, exc) from None
    global_step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors, global_step if isinstance(global_step, int) else None


def _unloadable(path: Path, exc: Exception) -> UserError:
    return UserError(f"{path} cannot be loaded as tensors only ({type(exc).__name__}: {first_line(exc, 200)}); "
                     "re-save it as .safetensors")


# ---- materializing


def materialize(path: Path, allow_pickle: bool = False, asked_prediction: str = None) -> Path:
    """The diffusers folder (in the cache) holding the checkpoint's components; `asked_prediction`:
    --prediction-type (`prediction_type`)."""
    from .model_cache import cached_folder, sha256_file

    path = Path(path).expanduser()
    entries, load, global_step = read_entries(path, allow_pickle)
    found = recognise(path, entries, asked_prediction, global_step)
    log.info("%s: %s%s checkpoint, architecture %s, %s", path, found.kind.name,
             f" {found.variant}" if found.variant else "", found.family, found.prediction_type)
    spec = {"file_sha256": sha256_file(path), "family": found.family, "variant": found.variant,
            "prediction_type": found.prediction_type}
    return cached_folder(f"single-file-{path.stem[:40]}", spec, lambda tmp: _write_folder(tmp, found, load))


def _write_folder(dest: Path, found: Recognised, load) -> None:
    import gc

    from .random_models import load_clip_tokenizer, scheduler_for

    arch = found.architecture
    jobs = converters(found.kind, arch)
    for component in found.components:
        keep, convert = jobs[component]
        state = convert(load(keep))
        model = _meta_model(component, arch)
        expected = set(model.state_dict())
        missing = expected - set(state)
        if missing:
            raise UserError(f"checkpoint lacks {len(missing)} {component} tensors, e.g. {sorted(missing)[0]}")
        # Non-persistent buffers (CLIP's position ids) stay on the meta device: they are not saved.
        model.load_state_dict({k: v.contiguous() for k, v in state.items() if k in expected}, strict=True, assign=True)
        model.save_pretrained(str(dest / component), safe_serialization=True)
        del state, model
        gc.collect()
    family = with_prediction(registry.family(found.family), found.prediction_type)
    for text in found.kind.texts:
        tokenizer = text.folder.replace("text_encoder", "tokenizer")
        load_clip_tokenizer(arch[tokenizer]["pad_token"]).save_pretrained(str(dest / tokenizer))
    scheduler = scheduler_for(family)
    scheduler.save_pretrained(str(dest / "scheduler"))
    index = _model_index(found, family, type(scheduler).__name__)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def with_prediction(family: dict, prediction: str) -> dict:
    """A family entry whose scheduler (SD's PNDM, or SDXL's published config) predicts `prediction`."""
    family["prediction_type"] = prediction
    if "scheduler" in family:
        family["scheduler"]["prediction_type"] = prediction
    return family


def _model_index(found: Recognised, family: dict, scheduler: str) -> dict:
    """model_index.json: the family's pipeline (SDXL's with its config), its inpainting variant for 9 channels."""
    pipeline = family.get("pipeline", "StableDiffusionPipeline")
    index = {"_class_name": pipeline.replace("Pipeline", "InpaintPipeline") if found.variant == "inpainting"
             else pipeline, **family.get("pipeline_config", {})}
    for component in ("unet", "vae") + tuple(text.folder for text in found.kind.texts):
        index[component] = list(MODEL_CLASSES[component]) if component in found.components else [None, None]
    for text in found.kind.texts:
        index[text.folder.replace("text_encoder", "tokenizer")] = list(TOKENIZER)
    index["scheduler"] = ["diffusers", scheduler]
    if "pipeline" not in family:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def convert_vae_file(path: Path, dest: Path, base) -> None:
    """`--custom-vae-version FILE`: a VAE alone (original layout, with or without `first_stage_model.`, or
    diffusers' layout), or a whole checkpoint's VAE, saved as the diffusers folder `dest`, in the
    architecture of the model's VAE (SD's when the model has none)."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(base.config("vae")) if base.has("vae") else registry.family("sd1")["architecture"]["vae"]
    entries, load, _ = read_entries(path, allow_pickle=True)  # the caller checked pickles against --allow-pickle
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    diffusers_layout = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in entries)
    meta = _meta_checkpoint(entries)
    converted = meta if diffusers_layout else convert_ldm_vae_checkpoint(meta, config)
    mismatch = _mismatch("vae", converted, model)
    if mismatch:
        raise UserError(f"--custom-vae-version {path}: not a VAE of this model's architecture ({mismatch})")
    state = load(lambda name: True)
    state = state if diffusers_layout else convert_ldm_vae_checkpoint(state, config)
    model.load_state_dict({k: v.contiguous() for k, v in state.items() if k in model.state_dict()},
                          strict=True, assign=True)
    model.save_pretrained(str(dest), safe_serialization=True)
