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
    # --latent-sizes: (h, w) pairs every UNet / VAE package accepts (Core ML enumerated shapes); () = one size
    latent_sizes: tuple = ()
    max_prompt_chunks: int = 1  # the UNet takes 1..N text-encoder windows side by side (77 * k tokens)
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
    prediction_type: str = None  # a single file's UNet predicts this (SD 2.x base or 768-v); None: single_file decides
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

    def sizes_or(self, default: int) -> tuple:
        """The latent sizes to convert for, default first: --latent-sizes, else --latent-h/-w (else `default`)."""
        return self.latent_sizes or ((self.latent_h or default, self.latent_w or default),)

    @property
    def flexible(self) -> bool:
        """The packages take several shapes (enumerated), not one."""
        return len(self.latent_sizes) > 1 or self.max_prompt_chunks > 1


def parse_latent_sizes(text: str) -> tuple:
    """`--latent-sizes HxW[,HxW...]` -> ((h, w), ...) in the order given, repeats dropped. The first is the
    default shape, the one Core ML compiles the Neural Engine's program for (other sizes may run elsewhere or
    be specialized at load): list the size you generate at most first."""
    if not str(text).strip():
        raise UserError("--latent-sizes is empty; list at least one latent size HxW (e.g. 64x64,64x96)")
    if str(text).strip().lower().startswith("aspect:"):
        return aspect_sizes(text)
    sizes = []
    for item in (part.strip() for part in str(text).split(",")):
        h, sep, w = item.lower().partition("x")
        if not (sep and h.strip().isdigit() and w.strip().isdigit() and int(h) > 0 and int(w) > 0):
            raise UserError(f"--latent-sizes {text!r}: {item!r} is not HxW (latent height x width, e.g. 64x64 for "
                            "512x512 images)")
        if (int(h), int(w)) not in sizes:
            sizes.append((int(h), int(w)))
    return tuple(sizes)


# `--latent-sizes aspect:PIXELS`: width:height ratios at about PIXELS x PIXELS pixels, the square (default) first.
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
ASPECT_STEP = 8  # latent granularity of the shorthand: 8 latents (64 pixels) pass every released UNet's downsampling


def aspect_sizes(text: str) -> tuple:
    """`aspect:512` -> the latent sizes of ASPECT_RATIOS at 512 x 512 pixels' area, each side rounded to ASPECT_STEP."""
    pixels = text.strip().partition(":")[2].strip()
    if not pixels.isdigit() or int(pixels) < 8 * ASPECT_STEP:
        raise UserError(f"--latent-sizes {text!r}: aspect:PIXELS takes a side in pixels of at least {8 * ASPECT_STEP} "
                        "(e.g. aspect:512)")
    side = int(pixels) / 8  # the square's latent side

    def rounded(value: float) -> int:
        return max(ASPECT_STEP, ASPECT_STEP * round(value / ASPECT_STEP))
    sizes = [(rounded(side * (h / w) ** 0.5), rounded(side * (w / h) ** 0.5)) for w, h in ASPECT_RATIOS]
    return tuple(dict.fromkeys(sizes))


def format_sizes(sizes) -> str:
    return ",".join(f"{h}x{w}" for h, w in sizes)


MAX_LATENT_SIZE = 512  # 4096-pixel images; far beyond every released model, and still a bounded allocation


def check_latent_size(options: ConversionOptions) -> None:
    listed = [(f"--latent-sizes {h}x{w}:", v) for h, w in options.latent_sizes for v in (h, w)]
    for flag, value in (("--latent-h", options.latent_h), ("--latent-w", options.latent_w), *listed):
        if value is not None and value > MAX_LATENT_SIZE:
            raise UserError(f"{flag} {value} is larger than {MAX_LATENT_SIZE} ({8 * MAX_LATENT_SIZE}-pixel images); "
                            "latent size is image size / 8")


def check_shapes(options: ConversionOptions) -> None:
    """The shape flags, before anything is loaded: a size list that says something, chunks of at least 1, and
    what Core ML's enumerated shapes allow."""
    if (options.latent_h or options.latent_w) and options.latent_sizes:
        raise UserError("pass either --latent-sizes or --latent-h/--latent-w, not both")
    if not isinstance(options.max_prompt_chunks, int) or options.max_prompt_chunks < 1:
        raise UserError(f"--max-prompt-chunks must be a whole number of at least 1, got {options.max_prompt_chunks!r}")
    if not all(len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size) for size in options.latent_sizes):
        raise UserError(f"latent sizes must be (height, width) pairs of whole numbers of at least 1, got "
                        f"{options.latent_sizes!r}")
    check_latent_size(options)
    if len(options.latent_sizes) > 1 and options.max_prompt_chunks > 1 and \
            options.min_deployment_target not in IOS18_TARGETS:
        raise UserError("--latent-sizes with several sizes and --max-prompt-chunks above 1 together need "
                        "--min-deployment-target iOS18 or macOS15 (before iOS 18, Core ML enumerates the shapes "
                        "of one input only)")


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
