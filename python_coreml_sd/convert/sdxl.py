"""SDXL conversions: which model is SDXL (`--xl-version`, or recognised from its folder), which components
come with the requested ones (Apple's: --convert-text-encoder converts both encoders, --convert-unet with
--refiner-version the refiner's UNet too), and the folders that are SDXL-shaped but cannot be converted.
Everything here runs before any work, on configs only."""
from ..components import SDXL, TABLE
from ..errors import UserError


def is_xl(source) -> bool:
    """SDXL by its folder: model_index.json names an SDXL pipeline, or its UNet takes SDXL's added conditions."""
    return source.says_xl or (source.has("unet") and source.interface == SDXL)


def check_base(source, options) -> None:
    """The --model-version model is a complete SDXL base when it is SDXL at all (and is, with --xl-version)."""
    xl = is_xl(source)
    if options.xl_version and not xl:
        raise UserError(f"--xl-version: model {source.name!r} is not SDXL (its model_index.json names "
                        f"{source.pipeline_class or 'no pipeline'} and its UNet takes no text_time conditions); "
                        "drop --xl-version or pass an SDXL model")
    if not xl:
        if options.refiner_version:
            raise UserError(f"--refiner-version needs an SDXL base as --model-version; {source.name!r} is not SDXL")
        return
    source.require_base()
    check_xl_shape(source, "text_encoder", "text_encoder_2", "unet")


def check_xl_shape(source, *folders) -> None:
    """An SDXL folder has each of `folders` and a UNet with SDXL's added conditions; else one line naming what
    is missing."""
    for folder in folders:
        if not source.has(folder):
            raise UserError(f"model {source.name!r} is SDXL ({source.pipeline_class or 'an SDXL UNet'}) but has no "
                            f"{folder} (no '{folder}' folder in {source.root} or no entry in its model_index.json); "
                            "re-save the complete model with diffusers' save_pretrained()")
    if "unet" in folders:
        kind = source.config("unet").get("addition_embed_type")
        if kind != "text_time":
            raise UserError(f"model {source.name!r} is SDXL ({source.pipeline_class}) but its UNet's addition_embed_type "
                            f"is {kind!r}, not 'text_time' (SDXL's time ids and pooled text embeddings); the unet "
                            "folder is another model's")


def refiner_source(options_or_name):
    """The --refiner-version model (of conversion options, or a name), checked to be an SDXL refiner."""
    from ..model_sources import resolve
    name = getattr(options_or_name, "refiner_version", options_or_name)
    source = resolve(name, getattr(options_or_name, "allow_pickle", False))
    if not source.is_refiner:
        raise UserError(f"--refiner-version {name!r} is not an SDXL refiner (its model_index.json "
                        f"names {source.pipeline_class or 'no pipeline'}"
                        f"{' and it has a first text_encoder' if source.has('text_encoder') else ''}, without "
                        "requires_aesthetics_score); pass the refiner model, e.g. stabilityai/stable-diffusion-xl-refiner-1.0")
    check_xl_shape(source, "text_encoder_2", "unet")
    return source


def with_companions(source, options, components: list) -> list:
    """`components` plus those their flags convert too on this model, in the table's order."""
    wanted = set(components)
    if "text_encoder" in wanted and is_xl(source):
        wanted.add("text_encoder_2")
    if options.refiner_version:
        if "unet" not in wanted:
            raise UserError("--refiner-version converts the refiner's UNet beside the base UNet: add --convert-unet")
        wanted.add("refiner")
    return [name for name in TABLE if name in wanted]
