"""The model a conversion reads: `--model-version` with `--lora`, `--textual-inversion` and
`--custom-vae-version` applied, as a diffusers folder in the cache like any other ModelSource.

The edited folder is built once (keyed by the base model's files and the sha256 and settings of each
edit), component by component: the UNet and the text encoder(s) (SDXL's two) are loaded, edited, saved
and released one at a time; untouched components are hard-linked. Every converter then runs unchanged on it.
"""
import json
import logging
from pathlib import Path

from .errors import UserError
from .model_sources import ModelSource, resolve

log = logging.getLogger("python_coreml_sd")


def source_for(options) -> ModelSource:
    """The ModelSource of a conversion (or bundle): the model with its edits applied (their files' existence is
    checked here only: lora and textual_inversion read them after)."""
    base = resolve(options.model_version, options.allow_pickle, options.prediction_type)
    if not options.edits_model:
        return base
    from .model_cache import cached_folder, folder_fingerprint, sha256_file

    for kind, specs in (("LoRA", options.loras), ("textual inversion", options.textual_inversions)):
        for spec in specs:
            if not Path(spec.path).is_file():
                raise UserError(f"{kind} file {spec.path} does not exist")
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


TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # SDXL has both encoders


def _build(dest: Path, base: ModelSource, options, vae) -> None:
    from .components import MODEL_CLASSES, SDXL
    from .model_cache import link_component

    index = dict(base.index)
    xl = base.interface == SDXL
    lora_states = []
    if options.loras:
        from .lora import lora_state_dict
        lora_states = [(spec, *lora_state_dict(spec.path, options.allow_pickle, xl)) for spec in options.loras]
    edits_text = bool(lora_states or options.textual_inversions)
    counts = {}
    for component in sorted(p.name for p in base.root.iterdir() if p.is_dir()):
        if component == "unet" and lora_states and base.has("unet"):
            from .lora import merge_loras
            unet = base.load_unet()
            counts["unet"] = merge_loras(unet, "unet", lora_states, base.name)
            unet.save_pretrained(str(dest / "unet"), safe_serialization=True)
            del unet
        elif component in TOKENIZERS and edits_text and base.has(component):
            counts.update(_edit_text_encoder(dest, base, component, options, lora_states, xl))
        elif component == "vae" and vae is not None:
            continue
        elif (component in TOKENIZERS.values() and options.textual_inversions
              and any(base.has(encoder) for encoder, tok in TOKENIZERS.items() if tok == component)):
            continue  # written with its text encoder
        else:
            link_component(base.root / component, dest / component)
    if lora_states:
        from .lora import check_counts
        check_counts(options.loras, counts)
    if vae is not None:
        _write_vae(vae, dest / "vae", base)
        index["vae"] = list(MODEL_CLASSES["vae"])
    (dest / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _edit_text_encoder(dest: Path, base: ModelSource, component: str, options, lora_states, xl: bool) -> dict:
    """A text encoder with the LoRAs merged and the embeddings added (its tokenizer saved with their
    tokens; SDXL's: each encoder its own part of the embedding); returns its LoRA counts."""
    text_encoder = getattr(base, f"load_{component}")()
    counts = {}
    if lora_states:
        from .lora import merge_loras
        counts[component] = merge_loras(text_encoder, component, lora_states, base.name)
    if options.textual_inversions:
        from .textual_inversion import XL_KEYS, add_embeddings
        tokenizer = getattr(base, f"load_{TOKENIZERS[component]}")()
        tokens = add_embeddings(text_encoder, tokenizer, options.textual_inversions, options.allow_pickle,
                                XL_KEYS[component] if xl else None)
        log.warning("textual inversion (%s): added token(s) %s", component, ", ".join(tokens))
        tokenizer.save_pretrained(str(dest / TOKENIZERS[component]))
    text_encoder.save_pretrained(str(dest / component), safe_serialization=True)
    return counts


def _write_vae(vae: Path, dest: Path, base: ModelSource) -> None:
    from .model_cache import link_component
    if vae.is_dir():
        link_component(vae, dest)
        return
    from .single_file import convert_vae_file
    convert_vae_file(vae, dest, base)
