"""The model a conversion reads: `--model-version` with `--lora`, `--textual-inversion` and
`--custom-vae-version` applied, as a diffusers folder in the cache like any other ModelSource.

The edited folder is built once (keyed by the base model's files and the sha256 and settings of each
edit), component by component: the UNet and the text encoder are loaded, edited, saved and released
one at a time; untouched components are hard-linked. Every converter then runs unchanged on it.
"""
import json
import logging
from pathlib import Path

from .errors import UserError
from .model_sources import ModelSource, resolve

log = logging.getLogger("python_coreml_sd")


def source_for(options) -> ModelSource:
    """The ModelSource of a conversion (or bundle): the model with its edits applied."""
    base = resolve(options.model_version, options.allow_pickle)
    if not options.edits_model:
        return base
    from .model_cache import cached_folder, folder_fingerprint, sha256_file

    for spec in options.loras:
        if not Path(spec.path).is_file():
            raise UserError(f"LoRA file {spec.path} does not exist")
    for spec in options.textual_inversions:
        if not Path(spec.path).is_file():
            raise UserError(f"textual inversion file {spec.path} does not exist")
    vae = _custom_vae(options, base) if options.custom_vae_version else None
    spec = {
        "base": folder_fingerprint(base.root),
        "loras": [[sha256_file(s.path), s.scale] for s in options.loras],
        "textual_inversions": [[sha256_file(s.path), s.token] for s in options.textual_inversions],
        "vae": vae and (folder_fingerprint(vae) if vae.is_dir() else sha256_file(vae)),
    }
    root = cached_folder("edited", spec, lambda tmp: _build(tmp, base, options, vae))
    return ModelSource(options.model_version, root)


def lora_records(options) -> list:
    """What the packages' metadata says of each merged LoRA: file name, sha256, scale."""
    from .model_cache import sha256_file
    return [{"file": Path(s.path).name, "sha256": sha256_file(s.path), "scale": s.scale} for s in options.loras]


def embedding_records(options) -> list:
    from .model_cache import sha256_file
    return [{"file": Path(s.path).name, "sha256": sha256_file(s.path), "token": s.token} for s in options.textual_inversions]


def _custom_vae(options, base: ModelSource) -> Path:
    """The VAE folder (or single VAE file) that replaces the model's."""
    value = options.custom_vae_version
    path = Path(value).expanduser()
    if path.is_file():
        from .single_file import check_suffix
        check_suffix(path, options.allow_pickle)
        return path.resolve()
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return path.resolve()  # a diffusers VAE folder (AutoencoderKL.save_pretrained)
    other = resolve(value, options.allow_pickle)
    other.require("vae")
    return other.root / "vae"


def _build(dest: Path, base: ModelSource, options, vae) -> None:
    from .model_cache import link_component

    index = dict(base.index)
    lora_states = []
    if options.loras:
        from .lora import lora_state_dict
        lora_states = [(spec, *lora_state_dict(spec.path, options.allow_pickle)) for spec in options.loras]
    counts = {}
    for component in sorted(p.name for p in base.root.iterdir() if p.is_dir()):
        src = base.root / component
        if component == "unet" and lora_states and base.has("unet"):
            from .lora import merge_loras
            unet = base.load_unet()
            counts["unet"] = merge_loras(unet, "unet", lora_states, base.name)
            unet.save_pretrained(str(dest / "unet"), safe_serialization=True)
            del unet
        elif component == "text_encoder" and (lora_states or options.textual_inversions) and base.has("text_encoder"):
            text_encoder = base.load_text_encoder()
            if lora_states:
                from .lora import merge_loras
                counts["text_encoder"] = merge_loras(text_encoder, "text_encoder", lora_states, base.name)
            if options.textual_inversions:
                from .textual_inversion import add_embeddings
                tokenizer = base.load_tokenizer()
                tokens = add_embeddings(text_encoder, tokenizer, options.textual_inversions, options.allow_pickle)
                log.warning("textual inversion: added token(s) %s", ", ".join(tokens))
                tokenizer.save_pretrained(str(dest / "tokenizer"))
            text_encoder.save_pretrained(str(dest / "text_encoder"), safe_serialization=True)
            del text_encoder
        elif component == "vae" and vae is not None:
            continue
        elif component == "tokenizer" and options.textual_inversions:
            continue  # written with the text encoder
        else:
            link_component(src, dest / component)
    if lora_states:
        from .lora import check_counts
        check_counts(options.loras, counts)
    if vae is not None:
        _write_vae(vae, dest / "vae", base)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _write_vae(vae: Path, dest: Path, base: ModelSource) -> None:
    from .model_cache import link_component
    if vae.is_dir():
        link_component(vae, dest)
        return
    from .single_file import convert_vae_file
    convert_vae_file(vae, dest, base)
