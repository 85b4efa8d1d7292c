"""Assemble a pipeline for a backend from the user's flags (shared by the pipeline and parity CLIs)."""
from pathlib import Path

import torch

from ..components import TOKENIZER_FILES
from ..controlnets import controlnet_names, resolve_controlnet
from ..errors import UserError
from ..model_sources import resolve
from ..runtime import RUNTIME_BACKENDS
from .components import ModelSet, load_converted, load_torch
from .pipeline import StableDiffusionPipeline

# What the pipeline runs (--backend): converted models in a runtime, or "torch", the original
# diffusers modules (the reference).
PIPELINE_BACKENDS = (*RUNTIME_BACKENDS, "torch")


def converted_models(models_dir, backend, device="cpu", compute_unit="ALL", img2img=False,
                     model_version=None, controlnets=(), torch_compile=False) -> ModelSet:
    if models_dir is None:
        raise UserError(f"backend {backend!r} runs converted models: pass -i with their folder")
    needed = ["text_encoder", "unet", "vae_decoder"] + (["vae_encoder"] if img2img else [])
    # SDXL's text_encoder_2 is required by the pipeline once it sees the UNet's added conditions
    return load_converted(Path(models_dir), backend, device, compute_unit, needed, model_version, controlnets,
                          torch_compile)


def build_pipeline(models: ModelSet, source, progress=True, tokenizer=None, models_dir=None) -> StableDiffusionPipeline:
    """The loop over `models`, with `source`'s tokenizers, scheduler and VAE scaling (SDXL's 0.13025) and, for
    SDXL, its model_index.json's force_zeros_for_empty_prompt. `models_dir`: a bundle whose added tokens
    (textual inversion) the second tokenizer takes too."""
    vae_config = source.config("vae")
    return StableDiffusionPipeline(models, tokenizer or source.load_tokenizer(), source.config("scheduler"),
                                   vae_scaling_factor=vae_config.get("scaling_factor", 0.18215), progress=progress,
                                   tokenizer_2=second_tokenizer(source, models_dir),
                                   force_zeros_for_empty_prompt=bool(source.index.get("force_zeros_for_empty_prompt")))


def second_tokenizer(source, models_dir=None):
    """SDXL's tokenizer_2 with the bundle's added tokens (the same ids as the first's: both vocabularies have
    49,408 entries), or None for a model with one text encoder."""
    if not source.has("tokenizer_2"):
        return None
    from ..tokenizer_files import load_added_tokens
    tokenizer = source.load_tokenizer_2()
    return load_added_tokens(tokenizer, models_dir) if models_dir is not None else tokenizer


def bundled_tokenizer(models_dir):
    """The CLIP tokenizer a Resources folder carries (ours, Apple's, Hugging Face's published zips:
    vocab.json + merges.txt beside the models), or None: the text encoder was converted with it."""
    if models_dir is None:
        return None
    vocab, merges = (Path(models_dir) / name for name in TOKENIZER_FILES)
    if not (vocab.is_file() and merges.is_file()):
        return None
    from transformers import CLIPTokenizer
    from ..tokenizer_files import load_added_tokens
    try:
        tokenizer = CLIPTokenizer(str(vocab), str(merges))
    except Exception as exc:  # the tokenizers library raises bare Exceptions for unreadable files
        raise UserError(f"{models_dir}: vocab.json / merges.txt are not a CLIP tokenizer ({type(exc).__name__}); "
                        "re-bundle the models or remove the two files") from None
    return load_added_tokens(tokenizer, models_dir)  # textual-inversion tokens, when the bundle has them


def open_pipeline(backend, models_dir=None, model_version="tiny", device="cpu", compute_unit="ALL",
                  img2img=False, torch_precision="float32", progress=True,
                  refiner_version=None, controlnet=None, prediction_type=None,
                  torch_compile=False, sizes=()) -> StableDiffusionPipeline:
    """Library entry point behind `python -m python_coreml_sd.pipeline`. `refiner_version`: the SDXL refiner
    whose UNet the torch backend runs after --refiner-start (converted backends find its package in the folder);
    `controlnet`: a ControlNet or several (converted: their ControlNet_<name> packages; torch: folders or registry
    names) whose residuals, scaled and summed, steer the UNet; `prediction_type`: a single-file model_version's (--prediction-type); `sizes`:
    (height, width) pixel sizes the requests ask for, which the torch backend without converted models takes
    besides the model's own (with them, it takes theirs, as parity compares); `torch_compile`: the mil
    backend's UNet under torch.compile."""
    if backend not in PIPELINE_BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(PIPELINE_BACKENDS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA GPU and a CUDA build of PyTorch; none is visible, use --device cpu")
    if torch_compile and backend != "mil":
        raise UserError(f"--torch-compile compiles the MIL runtime's UNet: it needs --backend mil, not {backend}")
    if models_dir is not None:  # a .zip bundle is extracted (checked, once) into the cache
        from ..bundle import models_folder
        models_dir = models_folder(models_dir)
    source = resolve(model_version, prediction_type=prediction_type)
    source.require_base()
    controlnets = controlnet_names(controlnet)
    if backend == "torch":
        latent_sizes, prompt_chunks = (_converted_shapes(models_dir, model_version) if models_dir else
                                       (requested_latent_sizes(source, sizes), 1))
        from ..convert.sdxl import refiner_source
        refiner = refiner_source(refiner_version) if refiner_version else None
        dtype = {"float32": torch.float32, "float16": torch.float16}[torch_precision]
        models = load_torch(source, latent_sizes[0], device=device, dtype=dtype,
                            refiner=refiner, controlnets=[resolve_controlnet(name) for name in controlnets],
                            latent_sizes=latent_sizes, prompt_chunks=prompt_chunks)
        models.any_prompt_length = models_dir is None  # no package fixes the context's windows
    else:
        models = converted_models(models_dir, backend, device, compute_unit, img2img, model_version, controlnets,
                                  torch_compile)
    return build_pipeline(models, source, progress, bundled_tokenizer(models_dir), models_dir)


def requested_latent_sizes(source, sizes) -> tuple:
    """The model's own latent size, then those of the requested (height, width) pixel sizes (None: the default's
    side): each side a multiple of 8 times the UNet's downsampling, or one line saying so."""
    config = source.config("unet")
    default = config["sample_size"]
    step = 8 * 2 ** (len(config["block_out_channels"]) - 1)
    latent = [(default, default)]
    for height, width in sizes:
        h, w = height or 8 * default, width or 8 * default
        if h % step or w % step:
            raise UserError(f"--height {h} --width {w}: {source.name}'s UNet makes images whose sides are multiples "
                            f"of {step} pixels")
        latent.append((h // 8, w // 8))
    return tuple(dict.fromkeys(latent))


def _converted_shapes(models_dir, model_version=None) -> tuple:
    """(latent sizes, default first; prompt windows) of the converted UNet (whole, first chunk, or controlled),
    so the reference takes the same."""
    from .components import _package_inputs, check_inputs, find_packages
    found = find_packages(Path(models_dir), model_version)
    component = next((c for c in ("unet", "unet_chunk1", "control-unet", "control-unet_chunk1") if c in found), None)
    if component is None:
        raise UserError(f"models folder {models_dir} has no UNet package to read the latent size from")
    path = found[component]
    shapes, _, enumerated = _package_inputs(path)
    check_inputs(component, path, shapes)
    second = component.replace("_chunk1", "_chunk2")
    if component != second and second in found:  # the context may reach the second chunk only
        more, _, more_enumerated = _package_inputs(found[second])
        shapes, enumerated = {**more, **shapes}, {**more_enumerated, **enumerated}
    sizes = tuple(dict.fromkeys(tuple(s[2:]) for s in enumerated.get("sample", [shapes["sample"]])))
    text = found.get("text_encoder")
    sequence = _package_inputs(text)[0].get("input_ids", (1, 77))[1] if text else 77
    contexts = [s[-1] for s in enumerated.get("encoder_hidden_states", [shapes["encoder_hidden_states"]])]
    return sizes, max(max(c // sequence for c in contexts), 1)

