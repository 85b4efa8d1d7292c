"""The component table: what each Stable Diffusion component is called and takes, written once.

The converter CLI (which components exist, where their weights are, which converter makes each),
the generation backends (file and Resources names, input and output names), bundles (Resources names)
and the tests of the Swift package read this table; nothing else restates these names.
A new component (SDXL's second text encoder, a ControlNet) is one entry here plus its converter module.
A component's inputs and outputs can differ by model family (SDXL's text encoders return penultimate
states, its UNets take added conditions): each entry maps the families it exists for to an `Interface`.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UserError


# The interfaces a component can have, by model family: SD 1.x / 2.x, and SDXL (base and refiner), whose
# converted text encoders return penultimate hidden states and whose UNets take added conditions.
SD, SDXL = "sd", "sdxl"
INTERFACES = (SD, SDXL)


def interface_of(unet_config: dict) -> str:
    """The interface family of a model, from its UNet's config: SDXL's UNets add `text_time` conditions."""
    return SDXL if unet_config.get("addition_embed_type") == "text_time" else SD


# Inpainting UNets (diffusers' StableDiffusionInpaintPipeline; Apple's converter keeps the name `sample`, with
# in_channels channels) take, concatenated on channels: the noisy latents, the mask at latent size (1 channel) and
# the masked image's latents.
MASK_CHANNELS = 1


def inpainting_channels(latent_channels: int = 4) -> int:
    return 2 * latent_channels + MASK_CHANNELS


def is_inpainting(unet_config: dict) -> bool:
    """An inpainting UNet, from its config: 9 input channels for 4 latent (output) channels."""
    return unet_config.get("in_channels", 4) == inpainting_channels(unet_config.get("out_channels", 4))


def sample_dims(unet_config: dict) -> dict:
    """The Dims fields a UNet's config decides for its `sample`: latent channels, inpainting."""
    return {"latent_channels": unet_config.get("out_channels", 4), "inpaint": is_inpainting(unet_config)}


@dataclass(frozen=True)
class Dims:
    """The sizes every interface shape is a function of (from the model's configs and the options)."""
    latent_h: int
    latent_w: int
    unet_batch: int = 2  # classifier-free guidance in one call; 1 with --unet-batch-one
    latent_channels: int = 4
    text_hidden: int = 768  # the UNet's cross-attention input: the text encoder's width (SDXL: both summed)
    sequence: int = 77  # tokens of the text encoder
    clip_image: int = 224  # the safety checker's CLIP image size
    time_ids: int = 6  # SDXL: original size, crop top-left, target size (refiner: aesthetic score for the last)
    text_pooled: int = 1280  # SDXL: the pooled text_embeds of text_encoder_2 (its projection_dim)
    # ControlNet: (channels, height, width) of each residual it adds to the UNet, down blocks' then the mid
    # block's (`residual_shapes`); the ControlNet's outputs and the controlled UNet's extra inputs
    residuals: tuple = ()
    inpaint: bool = False  # the UNet's sample also carries the mask and the masked image's latents

    @property
    def sample_channels(self) -> int:
        """The UNet's `sample` channels: the latents, or for an inpainting UNet those of `inpainting_channels`."""
        return inpainting_channels(self.latent_channels) if self.inpaint else self.latent_channels

    @property
    def image_hw(self) -> tuple:
        return 8 * self.latent_h, 8 * self.latent_w

    def variants(self, latent_sizes=(), prompt_chunks: int = 1) -> list:
        """These Dims at each latent size (h, w) and each UNet context of k text-encoder windows, k in
        1..prompt_chunks: the cross product, latent sizes outer. The first is the default shape: latent_sizes[0]
        and one window (no sizes: this Dims' own latent size)."""
        sizes = tuple(latent_sizes) or ((self.latent_h, self.latent_w),)
        return [replace(self, latent_h=h, latent_w=w, sequence=self.sequence * k)
                for h, w in sizes for k in range(1, prompt_chunks + 1)]


@dataclass(frozen=True)
class Interface:
    """What a converted component takes and returns: names in Apple's order, shapes as a function of Dims."""
    inputs: tuple = ()  # input names as converters declare them (Apple's interface: docs/compat.md)
    outputs: tuple = ()
    shapes: object = None  # Dims -> the inputs' shapes, in the order of `inputs`
    # A numbered group after `inputs` / `outputs` (ControlNet residuals: "additional_residual_{}"), one per
    # entry of Dims.residuals
    more_inputs: str = None
    more_outputs: str = None

    def feed(self, *values) -> dict:
        """{input name: value} for values given in the order of `inputs` (then the numbered group's)."""
        if len(values) != len(self.inputs) and not (self.more_inputs and len(values) > len(self.inputs)):
            raise TypeError(f"takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(values)}")
        return dict(zip(self.inputs + numbered(self.more_inputs, len(values) - len(self.inputs)), values))

    def input_names(self, dims: Dims) -> tuple:
        return self.inputs + numbered(self.more_inputs, len(dims.residuals))

    def output_names(self, dims: Dims) -> tuple:
        return self.outputs + numbered(self.more_outputs, len(dims.residuals))

    def input_shapes(self, dims: Dims) -> dict:
        """{input name: shape} of this interface for `dims`."""
        return dict(zip(self.input_names(dims), self.shapes(dims)))

    def enumerated_shapes(self, variants: list) -> dict:
        """{input name: [shape per Dims of `variants`]} for the inputs whose shape differs between them (the
        Core ML enumerated shapes of a package taking every variant; the first is the default). Inputs of one
        shape for all are left out (fixed). Several inputs listed: their lists pair up index by index."""
        per_input = zip(*(self.shapes(dims) for dims in variants))
        names = self.input_names(variants[0])
        return {name: list(shapes) for name, shapes in zip(names, per_input) if len(set(shapes)) > 1}


def numbered(pattern: str, count: int) -> tuple:
    """`pattern` numbered 0..count-1 (Apple's additional_residual_0, ...); () without a pattern."""
    return tuple(pattern.format(i) for i in range(count)) if pattern else ()


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # package suffix, Apple's: Stable_Diffusion_version_<model>_<name>.mlpackage
    resource: str  # Apple's Resources name: <resource>.mlmodelc / .mlpackage in Swift bundles
    source_folder: str = None  # the diffusers subfolder it is converted from; None: cut from another package
    interfaces: dict = None  # interface family (SD, SDXL) -> Interface; the families it exists for
    converter: str = None  # "module:function" in python_coreml_sd.convert
    # The component whose --convert-* flag also converts this one (Apple's: --convert-text-encoder converts
    # SDXL's second encoder, --convert-unet with --refiner-version the refiner); None: a flag of its own.
    converted_with: str = None
    # The package's file name, {model} the model's name with '/' -> '_'; None: Apple's
    # Stable_Diffusion_version_{model}_<name>.mlpackage
    package: str = None

    def package_name(self, model: str) -> str:
        pattern = self.package or f"Stable_Diffusion_version_{{model}}_{self.name}.mlpackage"
        return pattern.replace("{model}", model).replace("/", "_")

    def io(self, family: str = None) -> Interface:
        """The interface of this component in a model family (default: the first it has, SD's for most)."""
        family = family or next(iter(self.interfaces))
        if family not in self.interfaces:
            raise KeyError(f"{self.name} has no {family} interface (it has {', '.join(self.interfaces)})")
        return self.interfaces[family]

    # The first family's interface, for the components that have one interface or callers that mean SD's.
    inputs = property(lambda self: self.io().inputs)
    outputs = property(lambda self: self.io().outputs)
    shapes = property(lambda self: self.io().shapes)

    def feed(self, *values, family: str = None) -> dict:
        try:
            return self.io(family).feed(*values)
        except TypeError as exc:
            raise TypeError(f"{self.name} {exc}") from None

    def input_shapes(self, dims: Dims, family: str = None) -> dict:
        return self.io(family).input_shapes(dims)

    def enumerated_shapes(self, variants: list, family: str = None) -> dict:
        return self.io(family).enumerated_shapes(variants)

    def names(self, family: str = None) -> tuple:
        """Every input and output name of the interface, inputs first."""
        return self.io(family).inputs + self.io(family).outputs

    @property
    def flag(self) -> str:
        return f"--convert-{(self.converted_with or self.name).replace('_', '-')}"


def _text_shapes(d: Dims) -> tuple:
    return ((1, d.sequence),)


def _unet_shapes(d: Dims) -> tuple:
    # encoder_hidden_states in the (B, C, 1, S) layout: text_to_unet_layout below.
    return (d.unet_batch, d.sample_channels, d.latent_h, d.latent_w), (d.unet_batch,), \
        (d.unet_batch, d.text_hidden, 1, d.sequence)


UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
# What each of SDXL's time_ids is, in order (diffusers' _get_add_time_ids): the base UNet's six (Dims.time_ids),
# the refiner's five (the aesthetic score instead of the target size). Bundles name them in pipeline_config.json.
TIME_IDS = {"unet": ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"),
            "refiner": ("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score")}
# SDXL's added conditions, Apple's names: time ids (B, 6; the refiner's 5) and text_encoder_2's pooled embeds.
UNET_XL_INPUTS = UNET_INPUTS + ("time_ids", "text_embeds")
UNET_INTERFACES = {
    SD: Interface(UNET_INPUTS, ("noise_pred",), _unet_shapes),
    SDXL: Interface(UNET_XL_INPUTS, ("noise_pred",),
                    lambda d: _unet_shapes(d) + ((d.unet_batch, d.time_ids), (d.unet_batch, d.text_pooled))),
}
# ControlNet (SD 1.x / 2.x; SDXL's below), Apple's names: its residuals are the ControlNet's outputs and, by the same names,
# the controlled UNet's inputs after the UNet's own; its condition image is 8x the latent size.
RESIDUAL = "additional_residual_{}"


def _residual_shapes(d: Dims) -> tuple:
    return tuple((d.unet_batch, *shape) for shape in d.residuals)


CONTROLNET = Interface(UNET_INPUTS + ("controlnet_cond",), (),
                       lambda d: _unet_shapes(d)[:3] + ((d.unet_batch, 3, *d.image_hw),), more_outputs=RESIDUAL)
CONTROLLED_UNET = Interface(UNET_INPUTS, ("noise_pred",), lambda d: _unet_shapes(d) + _residual_shapes(d),
                            more_inputs=RESIDUAL)


def _xl_added_shapes(d: Dims) -> tuple:
    return (d.unet_batch, d.time_ids), (d.unet_batch, d.text_pooled)


# SDXL's (Apple has none; ours): the ControlNet and the controlled UNet take the UNet's added conditions too, after
# the UNet's three inputs, as the SDXL UNet does
CONTROLNET_XL = Interface(UNET_XL_INPUTS + ("controlnet_cond",), (),
                          lambda d: _unet_shapes(d) + _xl_added_shapes(d) + ((d.unet_batch, 3, *d.image_hw),),
                          more_outputs=RESIDUAL)
CONTROLLED_UNET_XL = Interface(UNET_XL_INPUTS, ("noise_pred",),
                               lambda d: _unet_shapes(d) + _xl_added_shapes(d) + _residual_shapes(d),
                               more_inputs=RESIDUAL)


def unet_dims(config: dict, batch: int, h: int, w: int, seq_len: int, text_pooled: int = None) -> Dims:
    """The Dims of a UNet of this config (SD's or SDXL's) at one latent size and context length."""
    if interface_of(config) == SDXL:
        return xl_dims(config, batch, h, w, seq_len, text_pooled)
    return Dims(h, w, batch, text_hidden=config["cross_attention_dim"], sequence=seq_len, **sample_dims(config))


def controlled_dims(config: dict, batch: int, h: int, w: int, seq_len: int, text_pooled: int = None) -> Dims:
    """The Dims of a ControlNet and of the controlled UNet it steers (SD's or SDXL's): the UNet's, with the
    residuals of this latent size."""
    return replace(unet_dims(config, batch, h, w, seq_len, text_pooled), residuals=residual_shapes(config, h, w))


def xl_dims(config: dict, batch: int, h: int, w: int, seq_len: int, text_pooled: int):
    """Dims of an SDXL UNet: the number of time ids follows from its added-embedding input width,
    projection_class_embeddings_input_dim = pooled width + ids * addition_time_embed_dim (base 6, refiner 5)."""
    ids, rest = divmod(config["projection_class_embeddings_input_dim"] - text_pooled, config["addition_time_embed_dim"])
    if rest or ids < 1:
        raise UserError(f"this SDXL UNet's added embeddings ({config['projection_class_embeddings_input_dim']} wide) do "
                        f"not fit {text_pooled}-wide pooled text embeddings and {config['addition_time_embed_dim']}-wide "
                        "time-id embeddings: its text_encoder_2 is another model's")
    return Dims(h, w, unet_batch=batch, text_hidden=config["cross_attention_dim"], sequence=seq_len, time_ids=ids,
                text_pooled=text_pooled, **sample_dims(config))


def text_pooled_width(source):
    """The pooled text embeddings' width an SDXL UNet takes: text_encoder_2's projection; None for SD."""
    if interface_of(source.config("unet")) != SDXL:
        return None
    return source.config("text_encoder_2", ("projection_dim",))["projection_dim"]


def example_time_ids(h: int, w: int, count: int) -> list:
    """Time ids as the pipelines make them for an h x w latent: original size, crop (0, 0), then the target
    size (base, 6 ids) or an aesthetic score of 6 (refiner, 5)."""
    return [8.0 * h, 8.0 * w, 0.0, 0.0] + ([8.0 * h, 8.0 * w] if count == 6 else [6.0])


def with_residuals(variants: list, unet_config: dict) -> list:
    """Each of `variants` (Dims.variants) with the ControlNet residuals of its own latent size."""
    return [replace(d, residuals=residual_shapes(unet_config, d.latent_h, d.latent_w)) for d in variants]


def residual_shapes(unet_config: dict, latent_h: int, latent_w: int) -> tuple:
    """(channels, h, w) of the states a ControlNet adds to a UNet (diffusers' down_block_res_samples after
    conv_in, each resnet and each downsampler, then mid_block_res_sample), from the UNet's config."""
    channels = unet_config["block_out_channels"]
    h, w = latent_h, latent_w
    shapes = [(channels[0], h, w)]
    for i, width in enumerate(channels):
        shapes += [(width, h, w)] * unet_config.get("layers_per_block", 2)
        if i < len(channels) - 1:  # a stride-2 3x3 convolution, padding 1
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((width, h, w))
    return tuple(shapes) + ((channels[-1], h, w),)


# SDXL's encoders give the penultimate layer's states (Apple's name: hidden_embeds); text_encoder_2's
# pooled_outputs are its projected text_embeds, which condition the UNet.
XL_TEXT = Interface(("input_ids",), ("hidden_embeds", "pooled_outputs"), _text_shapes)


def _any(interface: Interface) -> dict:
    """The same interface in every family."""
    return {family: interface for family in INTERFACES}


def _chunks(unet: str, resource: str, families=INTERFACES) -> tuple:
    # Chunks (--chunk-unet) pass the tensors crossing the cut, whose names the cut decides; each chunk
    # takes those of the UNet's inputs it uses: chunk 1 at least `sample`.
    return (ComponentSpec(f"{unet}_chunk1", f"{resource}Chunk1",
                          interfaces={family: Interface(inputs=("sample",)) for family in families}),
            ComponentSpec(f"{unet}_chunk2", f"{resource}Chunk2",
                          interfaces={family: Interface(outputs=("noise_pred",)) for family in families}))


# In conversion order: the small components first, the UNet last but one (peak memory).
TABLE = {spec.name: spec for spec in (
    ComponentSpec("text_encoder", "TextEncoder", "text_encoder",
                  {SD: Interface(("input_ids",), ("last_hidden_state", "pooled_outputs"), _text_shapes), SDXL: XL_TEXT},
                  "text_encoder:convert_text_encoder"),
    ComponentSpec("text_encoder_2", "TextEncoder2", "text_encoder_2", {SDXL: XL_TEXT},
                  "text_encoder:convert_text_encoder_2", converted_with="text_encoder"),
    ComponentSpec("vae_decoder", "VAEDecoder", "vae",
                  _any(Interface(("z",), ("image",), lambda d: ((1, d.latent_channels, d.latent_h, d.latent_w),))),
                  "vae:convert_vae_decoder"),
    ComponentSpec("vae_encoder", "VAEEncoder", "vae",
                  _any(Interface(("x",), ("latent",), lambda d: ((1, 3, *d.image_hw),))), "vae:convert_vae_encoder"),
    ComponentSpec("unet", "Unet", "unet", UNET_INTERFACES, "unet:convert_unet"),
    *_chunks("unet", "Unet"),
    # SDXL's refiner UNet (--refiner-version MODEL), Apple's names; its source folder is the refiner model's unet.
    ComponentSpec("refiner", "UnetRefiner", "unet", {SDXL: UNET_INTERFACES[SDXL]}, "unet:convert_refiner",
                  converted_with="unet"),
    *_chunks("refiner", "UnetRefiner", (SDXL,)),
    # --convert-unet --unet-support-controlnet: the UNet taking a ControlNet's residuals, Apple's names
    ComponentSpec("control-unet", "ControlledUnet", "unet", {SD: CONTROLLED_UNET, SDXL: CONTROLLED_UNET_XL},
                  "unet:convert_controlled_unet",
                  converted_with="unet"),
    # with --chunk-unet: chunk 1 and 2 each take the residuals its ops add (Apple's ControlledUnetChunk1/2)
    *_chunks("control-unet", "ControlledUnet"),
    # --convert-controlnet MODEL...: one package per ControlNet, named after it (Apple's ControlNet_<model>)
    ComponentSpec("controlnet", "ControlNet", "unet", {SD: CONTROLNET, SDXL: CONTROLNET_XL},
                  "controlnet:convert_controlnets",
                  package="ControlNet_{model}.mlpackage"),
    ComponentSpec("safety_checker", "SafetyChecker", "safety_checker",
                  _any(Interface(("clip_input", "images", "adjustment"),
                                 ("filtered_images", "has_nsfw_concepts", "concept_scores"),
                                 lambda d: ((1, 3, d.clip_image, d.clip_image), (1, *d.image_hw, 3), (1,)))),
                  "safety_checker:convert_safety_checker"),
)}
# A diffusers folder -> the (library, class) its model_index.json names: the class it is loaded as, the only one supported.
MODEL_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                 "text_encoder": ("transformers", "CLIPTextModel"),
                 "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                 "safety_checker": ("stable_diffusion", "StableDiffusionSafetyChecker")}
TOKENIZER = ("transformers", "CLIPTokenizer")  # the class of every tokenizer folder (SDXL's tokenizer_2 too)


def new_model(component: str, architecture: dict):
    """A model of the class MODEL_CLASSES names for `component` (not the safety checker), built from its config in
    a registry `architecture` (CLIP text encoders: a CLIPTextConfig), with the weights the class initialises."""
    import importlib
    library, name = MODEL_CLASSES[component]
    cls = getattr(importlib.import_module(library), name)
    if library == "transformers":
        from transformers import CLIPTextConfig
        return cls(CLIPTextConfig(**architecture[component]))
    return cls(**architecture[component])


UNETS = ("unet", "refiner", "control-unet")  # the components converted by the UNet converter, with their chunks
# The CLIP BPE tokenizer files a Resources folder carries beside the models (ours, Apple's, Hugging Face's).
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CONVERTIBLE = tuple(name for name, spec in TABLE.items() if spec.converter)
FLAGGED = tuple(name for name in CONVERTIBLE if not TABLE[name].converted_with)  # a --convert-* flag each
BY_RESOURCE = {spec.resource: name for name, spec in TABLE.items()}
BY_PREFIX = {spec.package.split("{")[0]: name for name, spec in TABLE.items() if spec.package}
CONTROL = ("control-unet", "control-unet_chunk1", "control-unet_chunk2", "controlnet")  # what ControlNets add
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


# Resources keep each ControlNet as controlnet/<model> (Apple's layout: its CLI's --controlnet takes <model>).
CONTROLNET_FOLDER = "controlnet"


def resource_name(component: str, path: Path) -> str:
    """The Resources base name of a converted package of `component` (component_of): the table's, or for a
    ControlNet_<model> package controlnet/<model>."""
    if component != "controlnet":
        return TABLE[component].resource
    prefix = TABLE[component].package.split("{")[0]
    return f"{CONTROLNET_FOLDER}/{Path(path).stem[len(prefix):]}"


def component_of(path: Path):
    """The component a package or compiled model holds, by its name (ours or Apple's); None if neither."""
    path = Path(path)
    if path.suffix not in (".mlpackage", ".mlmodelc"):
        return None
    prefixed = [name for prefix, name in BY_PREFIX.items() if path.name.startswith(prefix)]
    if prefixed:  # ControlNet_<model>: whatever the model's name ends with
        return prefixed[0]
    match = _SUFFIX.search(path.stem)
    return match.group(1) if match else BY_RESOURCE.get(path.stem)


def is_unet(component: str) -> bool:
    """A UNet package (base or refiner) or one of its chunks: the UNet converter's flags shape it."""
    return component.split("_chunk")[0] in UNETS
