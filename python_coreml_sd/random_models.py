"""Random-weight Stable Diffusion models of a registry family: the embedded `tiny`, and full-size
architectures for benchmarks. Real component classes, deterministic weights, no network."""
from pathlib import Path

import torch

from . import registry
from .components import new_model
from .model_cache import cached_folder


def build_components(family_name: str, seed: int = 0) -> dict:
    """Instantiate every component of a family with weights drawn from `seed` (in this order: UNet, text
    encoder, second text encoder, VAE, safety checker; each only where the family has it)."""
    entry = registry.family(family_name)
    arch = entry["architecture"]
    torch.manual_seed(seed)
    components = {name: new_model(name, arch).eval() for name in ("unet", "text_encoder", "text_encoder_2", "vae")
                  if name in arch}
    for name in ("tokenizer", "tokenizer_2"):  # the second: SDXL's, for its OpenCLIP encoder
        if name in arch:
            components[name] = load_clip_tokenizer(arch[name]["pad_token"])
    components["scheduler"] = scheduler_for(entry)
    if "safety_checker" in arch:
        components["safety_checker"], components["feature_extractor"] = _build_safety_checker(
            arch["safety_checker"], arch["text_encoder"])
    return components


def scheduler_for(entry: dict):
    """The family's scheduler (SDXL's EulerDiscrete config, as published), else SD's PNDM."""
    import diffusers
    if "scheduler" in entry:
        config = dict(entry["scheduler"])
        return getattr(diffusers, config.pop("_class_name")).from_config(config)
    return diffusers.PNDMScheduler(**registry.scheduler_config(), prediction_type=entry["prediction_type"])


def load_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(registry.TOKENIZER_DIR / "vocab.json"), str(registry.TOKENIZER_DIR / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def _build_safety_checker(arch: dict, text_arch: dict):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={k: text_arch[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "vocab_size")},
        vision_config=arch["vision_config"], projection_dim=arch["projection_dim"])
    checker = StableDiffusionSafetyChecker(config)
    # The class initialises its concept embeddings to ones; draw them so that scores vary with the image.
    with torch.no_grad():
        for name in ("concept_embeds", "special_care_embeds"):
            getattr(checker, name).copy_(torch.randn_like(getattr(checker, name)))
        checker.concept_embeds_weights.fill_(0.5)
        checker.special_care_embeds_weights.fill_(0.5)
    size = arch["vision_config"]["image_size"]
    extractor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return checker.eval(), extractor


def save_diffusers_folder(components: dict, dest: Path, family_name: str = None) -> None:
    """Write components as a diffusers pipeline folder (safetensors weights): the family's pipeline class
    (StableDiffusionXLPipeline, ...) with its config, else StableDiffusionPipeline."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    entry = registry.family(family_name) if family_name else {}
    if "pipeline" in entry:
        import inspect
        cls, config = getattr(diffusers, entry["pipeline"]), entry.get("pipeline_config", {})
        modules = [name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                   if name != "self" and name not in config and parameter.default in (inspect.Parameter.empty, None)
                   and name != "add_watermarker"]
        pipe = cls(**{name: components.get(name) for name in modules}, **config)
        pipe.save_pretrained(str(dest), safe_serialization=True)
        return
    pipe = StableDiffusionPipeline(
        safety_checker=components.get("safety_checker"), feature_extractor=components.get("feature_extractor"),
        requires_safety_checker="safety_checker" in components,
        **{k: components[k] for k in ("unet", "text_encoder", "vae", "scheduler", "tokenizer")})
    pipe.save_pretrained(str(dest), safe_serialization=True)


def materialized_model_dir(family_name: str, seed: int = 0) -> Path:
    """The diffusers folder of a random-weight model, built once into the cache and reused.

    The folder name hashes the architecture and converter version, so a changed registry entry
    builds a fresh folder instead of reusing a stale one. Built in a temp folder, then renamed.
    """
    return cached_folder(f"{family_name}-seed{seed}", {"family": registry.family(family_name), "seed": seed},
                         lambda tmp: save_diffusers_folder(build_components(family_name, seed), tmp, family_name))


def build_controlnet(entry: dict):
    """A ControlNetModel for the UNet of the entry's family (diffusers' from_unet: the UNet's encoder half), its
    zero convolutions drawn from the entry's seed, so that the residuals are not zero and follow the condition
    image (as a trained one's do)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(entry.get("seed", 0))
    unet = UNet2DConditionModel(**registry.family(entry["family"])["architecture"]["unet"])
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(entry["conditioning_embedding_out_channels"]))
    with torch.no_grad():
        for module in controlnet.controlnet_cond_embedding.modules():  # He init: the image reaches the residuals
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight), torch.nn.init.zeros_(module.bias)
        for name, parameter in controlnet.named_parameters():
            if name.startswith("controlnet_") and not parameter.any():
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    return controlnet.eval()


def materialized_controlnet_dir(name: str) -> Path:
    """The diffusers folder (config.json, safetensors) of a registry ControlNet, built once into the cache."""
    entry = registry.named_controlnet(name)
    return cached_folder(name, {"controlnet": entry, "family": registry.family(entry["family"])},
                         lambda tmp: build_controlnet(entry).save_pretrained(str(tmp), safe_serialization=True),
                         marker="config.json")
