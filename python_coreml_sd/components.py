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
class Dims:
    """The sizes every interface shape is a function of (from the model's configs and the options)."""
    latent_h: int
    latent_w: int
    unet_batch: int = 2  # classifier-free guidance in one call; 1 with --unet-batch-one
    latent_channels: int = 4
    text_hidden: int = 768  # the text encoder's width: the UNet's cross-attention input
    sequence: int = 77  # tokens of the text encoder
    clip_image: int = 224  # the safety checker's CLIP image size

    @property
    def image_hw(self) -> tuple:
        return 8 * self.latent_h, 8 * self.latent_w


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # package suffix, Apple's: Stable_Diffusion_version_<model>_<name>.mlpackage
    resource: str  # Apple's Resources name: <resource>.mlmodelc / .mlpackage in Swift bundles
    source_folder: str = None  # the diffusers subfolder it is converted from; None: cut from another package
    inputs: tuple = ()  # input names as converters declare them (Apple's interface: docs/compat.md)
    outputs: tuple = ()
    converter: str = None  # "module:function" in python_coreml_sd.convert
    shapes: object = None  # Dims -> the inputs' shapes, in the order of `inputs`

    def feed(self, *values) -> dict:
        """{input name: value} for values given in the order of `inputs`."""
        if len(values) != len(self.inputs):
            raise TypeError(f"{self.name} takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), "
                            f"got {len(values)}")
        return dict(zip(self.inputs, values))

    def input_shapes(self, dims: Dims) -> dict:
        """{input name: shape} of this component's interface for `dims`."""
        return dict(zip(self.inputs, self.shapes(dims)))

    @property
    def flag(self) -> str:
        return f"--convert-{self.name.replace('_', '-')}"


UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")

# In conversion order: the small components first, the UNet last but one (peak memory).
TABLE = {spec.name: spec for spec in (
    ComponentSpec("text_encoder", "TextEncoder", "text_encoder", ("input_ids",),
                  ("last_hidden_state", "pooled_outputs"), "text_encoder:convert_text_encoder",
                  lambda d: ((1, d.sequence),)),
    ComponentSpec("vae_decoder", "VAEDecoder", "vae", ("z",), ("image",), "vae:convert_vae_decoder",
                  lambda d: ((1, d.latent_channels, d.latent_h, d.latent_w),)),
    ComponentSpec("vae_encoder", "VAEEncoder", "vae", ("x",), ("latent",), "vae:convert_vae_encoder",
                  lambda d: ((1, 3, *d.image_hw),)),
    # encoder_hidden_states in the (B, C, 1, S) layout: text_to_unet_layout below.
    ComponentSpec("unet", "Unet", "unet", UNET_INPUTS, ("noise_pred",), "unet:convert_unet",
                  lambda d: ((d.unet_batch, d.latent_channels, d.latent_h, d.latent_w), (d.unet_batch,),
                             (d.unet_batch, d.text_hidden, 1, d.sequence))),
    # Chunks (--chunk-unet) pass the tensors crossing the cut, whose names the cut decides; each chunk
    # takes those of the UNet's inputs it uses: chunk 1 at least `sample`.
    ComponentSpec("unet_chunk1", "UnetChunk1", inputs=("sample",)),
    ComponentSpec("unet_chunk2", "UnetChunk2", outputs=("noise_pred",)),
    ComponentSpec("safety_checker", "SafetyChecker", "safety_checker", ("clip_input", "images", "adjustment"),
                  ("filtered_images", "has_nsfw_concepts", "concept_scores"), "safety_checker:convert_safety_checker",
                  lambda d: ((1, 3, d.clip_image, d.clip_image), (1, *d.image_hw, 3), (1,))),
)}
# The CLIP BPE tokenizer files a Resources folder carries beside the models (ours, Apple's, Hugging Face's).
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CONVERTIBLE = tuple(name for name, spec in TABLE.items() if spec.converter)
BY_RESOURCE = {spec.resource: name for name, spec in TABLE.items()}
_SUFFIX = re.compile(r"_(" + "|".join(sorted(TABLE, key=len, reverse=True)) + r")$")


def text_to_unet_layout(hidden):
    """Text embeddings (B, S, C), as text encoders give them, -> (B, C, 1, S), the layout the converted UNet
    takes (Apple's: a Neural-Engine-friendly 4-D tensor). numpy arrays and torch tensors alike."""
    return hidden.swapaxes(1, 2)[:, :, None, :]


def text_from_unet_layout(states):
    """(B, C, 1, S) -> (B, S, C): the UNet's encoder_hidden_states back in diffusers' layout."""
    return states[:, :, 0, :].swapaxes(1, 2)


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
