"""The component table: what each Stable Diffusion component is called and takes, written once.

The converter CLI (which components exist, where their weights are, which converter makes each),
the generation backends (file and Resources names, input and output names), bundles (Resources names)
and the tests of the Swift package read this table; nothing else restates these names.
A new component (SDXL's second text encoder, a ControlNet) is one entry here plus its converter module.
"""
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # package suffix, Apple's: Stable_Diffusion_version_<model>_<name>.mlpackage
    resource: str  # Apple's Resources name: <resource>.mlmodelc / .mlpackage in Swift bundles
    source_folder: str = None  # the diffusers subfolder it is converted from; None: cut from another package
    inputs: tuple = ()  # input names as converters declare them (Apple's interface: docs/compat.md)
    outputs: tuple = ()
    converter: str = None  # "module:function" in python_coreml_sd.convert

    @property
    def flag(self) -> str:
        return f"--convert-{self.name.replace('_', '-')}"


UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")

# In conversion order: the small components first, the UNet last but one (peak memory).
TABLE = {spec.name: spec for spec in (
    ComponentSpec("text_encoder", "TextEncoder", "text_encoder", ("input_ids",),
                  ("last_hidden_state", "pooled_outputs"), "text_encoder:convert_text_encoder"),
    ComponentSpec("vae_decoder", "VAEDecoder", "vae", ("z",), ("image",), "vae:convert_vae_decoder"),
    ComponentSpec("vae_encoder", "VAEEncoder", "vae", ("x",), ("latent",), "vae:convert_vae_encoder"),
    ComponentSpec("unet", "Unet", "unet", UNET_INPUTS, ("noise_pred",), "unet:convert_unet"),
    # Chunks (--chunk-unet) pass the tensors crossing the cut, whose names the cut decides; each chunk
    # takes those of the UNet's inputs it uses: chunk 1 at least `sample`.
    ComponentSpec("unet_chunk1", "UnetChunk1", inputs=("sample",)),
    ComponentSpec("unet_chunk2", "UnetChunk2", outputs=("noise_pred",)),
    ComponentSpec("safety_checker", "SafetyChecker", "safety_checker", ("clip_input", "images", "adjustment"),
                  ("filtered_images", "has_nsfw_concepts", "concept_scores"), "safety_checker:convert_safety_checker"),
)}
# The CLIP BPE tokenizer files a Resources folder carries beside the models (ours, Apple's, Hugging Face's).
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CONVERTIBLE = tuple(name for name, spec in TABLE.items() if spec.converter)
BY_RESOURCE = {spec.resource: name for name, spec in TABLE.items()}
_SUFFIX = re.compile(r"_(" + "|".join(sorted(TABLE, key=len, reverse=True)) + r")$")


def converter(component: str):
    """The function converting `component` (imported on demand: converters pull in torch and coremltools)."""
    import importlib
    module, function = TABLE[component].converter.split(":")
    return getattr(importlib.import_module(f"python_coreml_sd.convert.{module}"), function)


def component_of(path: Path):
    """The component a package or compiled model holds, by its name (ours or Apple's); None if neither."""
    path = Path(path)
    if path.suffix not in (".mlpackage", ".mlmodelc"):
        return None
    match = _SUFFIX.search(path.stem)
    return match.group(1) if match else BY_RESOURCE.get(path.stem)
