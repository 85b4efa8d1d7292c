"""What a conversion is asked to do: typed options, and the checks that need nothing but them.

Light on purpose (no torch, no coremltools): CLIs build and check these before any heavy import.
"""
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DEPLOYMENT_TARGETS = ("macOS13", "iOS16", "macOS14", "iOS17", "macOS15", "iOS18")
IOS18_TARGETS = ("iOS18", "macOS15")  # 3-bit and per-grouped-channel look-up tables start here


@dataclass(frozen=True)
class LoraSpec:
    """`--lora FILE[:SCALE]`: a LoRA merged into the weights with this scale (default 1)."""
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        head, sep, tail = str(text).rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                if not Path(text).exists():
                    raise UserError(f"--lora {text}: {tail!r} is not a scale; use FILE or FILE:SCALE (e.g. 0.8)") from None
        return cls(Path(text))


@dataclass(frozen=True)
class EmbeddingSpec:
    """`--textual-inversion FILE[:TOKEN]`: an embedding added under TOKEN (default: the name it carries,
    else the file name without extension, as AUTOMATIC1111 does)."""
    path: Path
    token: str = None

    @classmethod
    def parse(cls, text: str) -> "EmbeddingSpec":
        head, sep, tail = str(text).rpartition(":")
        if sep and head and not Path(text).exists():
            if not tail.strip() or any(ch.isspace() for ch in tail):
                raise UserError(f"--textual-inversion {text}: the token {tail!r} is empty or holds spaces")
            return cls(Path(head), tail)
        return cls(Path(text))


@dataclass
class ConversionOptions:
    model_version: str
    output_dir: Path
    compute_precision: str = "float16"  # or "float32"
    min_deployment_target: str = "macOS13"
    latent_h: int = None  # None: the model's config
    latent_w: int = None
    text_token_sequence_length: int = None
    attention_implementation: str = "SPLIT_EINSUM"
    unet_batch_one: bool = False
    chunk_unet: bool = False
    overwrite: bool = False
    check_output_correctness: bool = False
    psnr_threshold: float = 35.0
    quantize_nbits: int = None  # palettize every large weight of every component to this many bits
    mixed_bit_recipe: str = None  # JSON recipe (layer -> bits) for the UNet
    palettize_granularity: str = "per_tensor"  # or "per_grouped_channel" (iOS18 targets)
    palettize_group_size: int = 32
    allow_pickle: bool = False  # load pickled checkpoints (.ckpt) as tensors (torch.load weights_only)
    loras: tuple = ()  # LoraSpec, merged in order
    textual_inversions: tuple = ()  # EmbeddingSpec
    custom_vae_version: str = None  # a model (folder, registry name, hub id) whose VAE replaces the model's, or a VAE file
    xl_version: bool = False  # the model is SDXL (Apple's --xl-version); an SDXL folder is recognised without it
    refiner_version: str = None  # an SDXL refiner (folder, registry name, hub id) whose UNet --convert-unet converts too
    controlnets: tuple = ()  # --convert-controlnet: ControlNets (folders, registry names), a package each
    unet_support_controlnet: bool = False  # --convert-unet writes the UNet taking ControlNet residuals instead

    @property
    def edits_model(self) -> bool:
        return bool(self.loras or self.textual_inversions or self.custom_vae_version)


MAX_LATENT_SIZE = 512  # 4096-pixel images; far beyond every released model, and still a bounded allocation


def check_latent_size(options: ConversionOptions) -> None:
    for flag, value in (("--latent-h", options.latent_h), ("--latent-w", options.latent_w)):
        if value is not None and value > MAX_LATENT_SIZE:
            raise UserError(f"{flag} {value} is larger than {MAX_LATENT_SIZE} ({8 * MAX_LATENT_SIZE}-pixel images); "
                            "latent size is image size / 8")


def check_compression(options: ConversionOptions) -> None:
    """Compression flags that cannot work fail before any conversion."""
    before_ios18 = options.min_deployment_target not in IOS18_TARGETS
    if options.palettize_granularity == "per_grouped_channel" and before_ios18:
        raise UserError("--palettize-granularity per_grouped_channel needs --min-deployment-target iOS18 or macOS15")
    if options.quantize_nbits == 3 and before_ios18:
        raise UserError("--quantize-nbits 3 needs --min-deployment-target iOS18 or macOS15 (before iOS 18, Core ML's "
                        "look-up tables hold 2, 4, 16, 64 or 256 entries)")
    if options.mixed_bit_recipe:
        from ..compression.recipes import load_recipe
        if 3 in load_recipe(options.mixed_bit_recipe).values() and before_ios18:
            raise UserError(f"mixed-bit recipe {options.mixed_bit_recipe}: 3 bits needs --min-deployment-target iOS18 "
                            "or macOS15 (before iOS 18, Core ML's look-up tables hold 2, 4, 16, 64 or 256 entries)")
