"""Resources/ folders laid out as Apple's Swift pipeline loads them: the models under their Resources
names (from the component table) plus the tokenizer files, scheduler_config.json and pipeline_config.json."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..components import SDXL, TABLE, TIME_IDS, TOKENIZER_FILES, component_of, resource_name
from ..errors import UserError
from ..package_io import replace_atomically
from .compile import compile_package, require_compiler

BASE_NAMES = {name: spec.resource for name, spec in TABLE.items()}
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_CONFIG = "pipeline_config.json"
DEFAULT_VAE_SCALING_FACTOR = 0.18215  # SD 1.x and 2.x; what Swift assumes without pipeline_config.json


def resource_entries(written_paths) -> dict:
    """Apple base name -> converted package, for the packages a conversion wrote; ControlNet_<name> goes to
    controlnet/<name>."""
    by_component = {}  # component (a ControlNet: its Resources name, one each) -> package
    for path in map(Path, written_paths):
        component = component_of(path)
        if component is None:
            raise UserError(f"{path} is not a converted Stable Diffusion component; cannot bundle it")
        by_component[component if component != "controlnet" else resource_name(component, path)] = path
    for unet in ("unet", "refiner", "control-unet"):  # apps load the chunks; the whole UNet would double the download
        if f"{unet}_chunk1" in by_component and f"{unet}_chunk2" in by_component:
            by_component.pop(unet, None)
    if not by_component:
        raise UserError("nothing to bundle: no converted packages")
    return {resource_name(c, p) if c in TABLE else c: p for c, p in sorted(by_component.items())}


def write_tokenizer(model_version: str, dest: Path, source=None) -> None:
    from ..model_sources import resolve
    from ..tokenizer_files import write_added_tokens
    tokenizer = (source or resolve(model_version)).load_tokenizer()
    write_added_tokens(tokenizer, dest)  # textual-inversion tokens: added_tokens.json
    save_bpe_files(tokenizer, dest)
    missing = [name for name in TOKENIZER_FILES if not (dest / name).is_file()]
    if missing:
        raise UserError(f"the tokenizer of {model_version!r} wrote no {', '.join(missing)}; "
                        "the Swift pipeline needs a CLIP BPE tokenizer (vocab.json + merges.txt)")


def save_bpe_files(tokenizer, dest: Path) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # transformers 5 tokenizers are `tokenizers`-backed: their BPE model writes both files
        backend.model.save(str(dest))
    else:
        tokenizer.save_vocabulary(str(dest))


def check_shared_tokenizer(source) -> None:
    """SDXL's two tokenizers must share vocab.json and merges.txt (they differ only in the pad token, which
    pipeline_config.json records): a Resources folder holds one pair, as Apple's SDXL pipeline reads it.
    Called before any conversion work."""
    if not source.has("tokenizer_2"):
        return
    with tempfile.TemporaryDirectory(prefix="python_coreml_sd_tokenizers.") as scratch:
        folders = [Path(scratch) / name for name in ("tokenizer", "tokenizer_2")]
        for folder, tokenizer in zip(folders, (source.load_tokenizer(), source.load_tokenizer_2())):
            folder.mkdir()
            save_bpe_files(tokenizer, folder)
        differing = [name for name in TOKENIZER_FILES
                     if not all((f / name).is_file() for f in folders)
                     or (folders[0] / name).read_bytes() != (folders[1] / name).read_bytes()]
    if differing:
        raise UserError(f"the model's tokenizer_2 has another {' and '.join(differing)} than its tokenizer; bundles "
                        "hold one CLIP vocabulary for both SDXL text encoders (as Apple's Resources do): convert "
                        "without --bundle-packages / --bundle-resources-for-swift-cli")


def write_scheduler_config(model_version: str, dest: Path, source=None) -> None:
    """The model's scheduler/scheduler_config.json, keys sorted, so the Swift package builds its
    scheduler from the model's own betas, prediction type, timestep spacing and steps offset (without
    the file it falls back to SD 1.x's). Models without a scheduler folder get none."""
    from ..model_sources import resolve
    source = source or resolve(model_version)
    if not source.has("scheduler"):
        return
    config = source.config("scheduler")
    (dest / SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def pipeline_settings(options) -> dict:
    """What the Swift loop needs from the model besides the Core ML files: the VAE's latent scaling
    factor, the text encoder's sequence length, the latent and image size the models were made for (the
    default of several) and, for packages of several shapes, their sizes and prompt windows."""
    from ..model_edits import source_for
    source = source_for(options)
    settings = {"vae_scaling_factor": DEFAULT_VAE_SCALING_FACTOR}
    if source.has("vae"):
        settings["vae_scaling_factor"] = float(source.config("vae").get("scaling_factor", DEFAULT_VAE_SCALING_FACTOR))
    if source.has("text_encoder"):
        length = source.config("text_encoder").get("max_position_embeddings")
        if length:
            settings["text_sequence_length"] = int(length)
    sample_size = source.config("unet").get("sample_size") if source.has("unet") else None
    if isinstance(sample_size, int):
        sample_size = [sample_size, sample_size]
    sizes = tuple(getattr(options, "latent_sizes", ()) or ())
    latent = list(sizes[0]) if sizes else [getattr(options, "latent_h", None), getattr(options, "latent_w", None)]
    if sample_size:
        latent = [value if value is not None else default for value, default in zip(latent, sample_size)]
    if None not in latent:
        settings["latent_size"] = [int(v) for v in latent]
        settings["image_size"] = [8 * int(v) for v in latent]
    settings.update(shape_settings(sizes, getattr(options, "max_prompt_chunks", 1)))
    settings.update(xl_settings(source, getattr(options, "refiner_version", None)))
    return settings


def xl_settings(source, refiner_version: str = None) -> dict:
    """What an SDXL pipeline needs besides SD's: the family; diffusers' force_zeros_for_empty_prompt (from
    model_index.json: no negative prompt -> zero negative conditioning); the second tokenizer's pad token
    (SDXL's tokenizer_2 shares vocab.json and merges.txt with the first but pads with "!", where the first pads
    with its end token); and what each time id is, the base's and, with --refiner-version, the refiner's."""
    if source.interface != SDXL:
        return {}
    settings = {"family": SDXL, "force_zeros_for_empty_prompt": bool(source.index.get("force_zeros_for_empty_prompt")),
                "time_ids": list(TIME_IDS["unet"])}
    if source.has("tokenizer_2"):
        tokenizer = source.load_tokenizer_2()
        # A tokenizer without a pad token pads with its end token (generation.prompts.chunk_prompt).
        settings["tokenizer_2_pad_token"] = str(tokenizer.pad_token if tokenizer.pad_token_id is not None
                                                else tokenizer.eos_token)
    if refiner_version:
        settings["refiner_time_ids"] = list(TIME_IDS["refiner"])
    return settings


def shape_settings(sizes: tuple, max_prompt_chunks: int) -> dict:
    """The enumerated shapes of the packages (--latent-sizes, default first; --max-prompt-chunks), when they
    have several: `latent_size` above is the default one."""
    settings = {"latent_sizes": [[int(h), int(w)] for h, w in sizes]} if len(sizes) > 1 else {}
    if max_prompt_chunks > 1:
        settings["max_prompt_chunks"] = int(max_prompt_chunks)
    return settings


def shapes_of(settings: dict) -> dict:
    """What an app (the Swift CLI too) reads back from pipeline_config.json: the latent sizes, default first
    (the one size without `latent_sizes`; none when the file names no size: the UNet's own shape decides), and
    the prompt-window counts the UNet takes, 1..max_prompt_chunks."""
    sizes = settings.get("latent_sizes") or ([settings["latent_size"]] if "latent_size" in settings else [])
    chunks = int(settings.get("max_prompt_chunks", 1))
    return {"latent_sizes": [[int(h), int(w)] for h, w in sizes], "prompt_chunk_counts": list(range(1, chunks + 1))}


def write_model_files(options, dest: Path) -> None:
    from ..model_edits import source_for
    source = source_for(options)  # with its edits: textual-inversion tokens
    write_tokenizer(options.model_version, dest, source)
    write_scheduler_config(options.model_version, dest, source)
    text = json.dumps(pipeline_settings(options), indent=2, sort_keys=True) + "\n"
    (dest / PIPELINE_CONFIG).write_text(text, encoding="utf-8")


def bundle_packages(options, written_paths, dest) -> Path:
    """`dest` (a Resources/ folder): the packages as TextEncoder.mlpackage, Unet.mlpackage, ... plus the
    tokenizer files, scheduler_config.json and pipeline_config.json; written beside `dest` and renamed into place."""
    entries = resource_entries(written_paths)

    def build(tmp: Path):
        tmp.mkdir()
        for name, package in entries.items():
            shutil.copytree(package, tmp / f"{name}.mlpackage")  # copytree makes controlnet/ too
        write_model_files(options, tmp)

    return replace_atomically(build, Path(dest), options.overwrite)


def bundle_compiled(options, written_paths, dest) -> Path:
    """`dest` (a Resources/ folder) as Apple's Swift CLI loads it: TextEncoder.mlmodelc, Unet.mlmodelc, ...
    plus the tokenizer files. macOS only."""
    require_compiler()
    entries = resource_entries(written_paths)

    def build(tmp: Path):
        tmp.mkdir()
        for name, package in entries.items():
            print(f"bundle: compiling {package.name} -> {name}.mlmodelc", file=sys.stderr, flush=True)
            compile_package(package, tmp, name)
        write_model_files(options, tmp)

    return replace_atomically(build, Path(dest), options.overwrite)
