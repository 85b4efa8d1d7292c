"""`--textual-inversion FILE[:TOKEN]`: embeddings added to the text encoder, their tokens to the tokenizer.

diffusers' `load_textual_inversion` does the work (diffusers' single-key and AUTOMATIC1111's formats,
multi-vector embeddings as TOKEN, TOKEN_1, ...). The tokens are added tokens of the CLIP tokenizer;
bundles carry them in `added_tokens.json` (token -> id) beside vocab.json and merges.txt, which the
Python pipeline and the Swift tokenizer read (python_coreml_sd.tokenizer_files, BPETokenizer.swift).
"""
from pathlib import Path

from .errors import UserError, first_line

A1111_SAFETENSORS_KEY = "emb_params"
# SDXL embeddings (as distributed, and as diffusers' docs load them): one tensor per text encoder.
XL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def read_embedding(path: Path, allow_pickle: bool = False):
    path = Path(path)
    if path.suffix == ".safetensors":
        from .weights import read_safetensors
        return read_safetensors(path)
    if not allow_pickle:
        raise UserError(f"textual inversion {path} is not a .safetensors file; pickles (.pt, .bin) are loaded only "
                        "with --allow-pickle (unpickling can run code)")
    import pickle

    import torch
    try:  # AUTOMATIC1111's .pt files nest dicts (string_to_param); weights_only allows plain containers
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError) as exc:
        raise UserError(f"{path} cannot be loaded as tensors only ({type(exc).__name__}); re-save it as .safetensors") from None
    return state


def token_for(spec, state) -> str:
    if spec.token:
        return spec.token
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) != A1111_SAFETENSORS_KEY:
        return next(iter(state))
    if isinstance(state, dict) and isinstance(state.get("name"), str):
        return state["name"]
    return spec.path.stem


class _Host:
    """What diffusers' TextualInversionLoaderMixin needs of a pipeline: a text encoder and a tokenizer."""

    hf_device_map = None
    components = {}


def _vectors(spec, state, part):
    """The embedding tensor of a file's state: SDXL's `part` ("clip_l" / "clip_g") for an SDXL model (part
    given), else the one tensor of diffusers' or AUTOMATIC1111's formats."""
    import torch
    xl_file = isinstance(state, dict) and set(XL_KEYS.values()) <= set(state)
    if xl_file != (part is not None):
        if xl_file:
            raise UserError(f"textual inversion {spec.path} is an SDXL embedding (clip_l and clip_g), but the model "
                            "is SD 1.x / 2.x; use an embedding made for this model's family")
        found = _vectors(spec, state, None)
        raise UserError(f"textual inversion {spec.path}: one embedding of width {found.shape[-1]} (SD 1.x / 2.x's "
                        "format), but an SDXL model needs an embedding with clip_l and clip_g tensors")
    if xl_file:
        return state[part]
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) == A1111_SAFETENSORS_KEY:
        state = next(iter(state.values()))
    vectors = state if isinstance(state, torch.Tensor) else (
        state["string_to_param"]["*"] if isinstance(state, dict) and "string_to_param" in state
        else next(iter(state.values())) if isinstance(state, dict) and len(state) == 1 else None)
    if not isinstance(vectors, torch.Tensor):
        raise UserError(f"textual inversion {spec.path}: no embedding found (expected one tensor, "
                        "AUTOMATIC1111's string_to_param, or SDXL's clip_l and clip_g)")
    return vectors


def add_embeddings(text_encoder, tokenizer, specs, allow_pickle: bool = False, part: str = None) -> list:
    """Add every embedding (of an SDXL model: its `part`, XL_KEYS of the encoder); returns the tokens added
    (multi-vector ones expanded)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    host = type("TextualInversionHost", (_Host, TextualInversionLoaderMixin), {})()
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    before = len(tokenizer)
    for spec in specs:
        state = read_embedding(spec.path, allow_pickle)
        vectors = _vectors(spec, state, part)
        if vectors.shape[-1] != width:
            raise UserError(f"textual inversion {spec.path}: embeddings of width {vectors.shape[-1]}, but the text "
                            f"encoder's are {width} wide (an embedding for another model family)")
        token = token_for(spec, state)
        try:
            host.load_textual_inversion(vectors.float(), token=token, tokenizer=tokenizer, text_encoder=text_encoder)
        except ValueError as exc:
            raise UserError(f"textual inversion {spec.path}: {first_line(exc)}") from None
    vocab = tokenizer.get_vocab()
    return sorted((t for t in vocab if vocab[t] >= before), key=vocab.get)
