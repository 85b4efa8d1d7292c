"""CLIP text encoders -> Core ML: `input_ids` (1, S) -> `last_hidden_state` (1, S, D), `pooled_outputs` (1, D).

SDXL's two encoders (Apple's interface): `hidden_embeds`, the penultimate layer's states (1, S, D), and
`pooled_outputs`: the pooler output of `text_encoder` (CLIPTextModel), the projected `text_embeds` of
`text_encoder_2` (CLIPTextModelWithProjection), which the UNet takes as its pooled condition."""
from collections import OrderedDict
from functools import partial

import torch

from ..errors import UserError
from ..components import SDXL, TABLE, Dims
from .common import convert_traced_component, kept_existing, output_path

DESCRIPTIONS = {
    "input_ids": "Token ids of the prompt from the CLIP tokenizer, padded or truncated to the sequence length",
    "last_hidden_state": "Text embeddings that condition the UNet (encoder_hidden_states)",
    "pooled_outputs": "Pooled text embedding (the end-of-text token's hidden state; SDXL's second encoder: "
                      "its projection, text_embeds)",
    "hidden_embeds": "Hidden states of the penultimate encoder layer, which condition SDXL's UNet",
}


class TextEncoderWrapper(torch.nn.Module):
    """Takes float ids (Core ML apps pass float arrays, as Apple's pipelines do) and returns plain tensors."""

    def __init__(self, text_encoder, hidden_layer: int = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_layer = hidden_layer  # SDXL: -2, the penultimate layer's states; None: the last (normed) ones

    def forward(self, input_ids):
        if self.hidden_layer is None:
            out = self.text_encoder(input_ids.to(torch.int32), return_dict=True)
            return out.last_hidden_state, out.pooler_output
        out = self.text_encoder(input_ids.to(torch.int32), output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[self.hidden_layer], pooled


def wrapper_for(text_encoder, family: str) -> TextEncoderWrapper:
    """The module converted (and, for the torch backend, run) for a text encoder of this interface family."""
    return TextEncoderWrapper(text_encoder, -2 if family == SDXL else None).eval()


def sample_inputs(text_encoder, sequence_length: int) -> "OrderedDict[str, torch.Tensor]":
    generator = torch.Generator().manual_seed(0)
    (shape,) = TABLE["text_encoder"].shapes(Dims(1, 1, sequence=sequence_length))
    ids = torch.randint(0, text_encoder.config.vocab_size, shape, generator=generator)
    ids[0, -1] = text_encoder.config.eos_token_id  # pooling reads the end token
    return OrderedDict(input_ids=ids.to(torch.float32))


def check_options(source, options) -> None:
    """Before any conversion: the sequence length fits the encoders' position embeddings."""
    positions = source.text_positions()
    length = options.text_token_sequence_length
    if length and length > positions:
        raise UserError(f"--text-token-sequence-length {length} exceeds the text encoder's {positions} positions; "
                        f"use at most {positions}")


def convert_text_encoder(source, options, component: str = "text_encoder") -> list:
    if kept_existing([output_path(options, component)], options, component):
        return [output_path(options, component)]
    family = source.interface
    wrapper = wrapper_for(source.load(component), family)
    length = options.text_token_sequence_length or wrapper.text_encoder.config.max_position_embeddings
    interface = TABLE[component].io(family)
    return convert_traced_component(wrapper, sample_inputs(wrapper.text_encoder, length), list(interface.outputs),
                                    options, component,
                                    {k: v for k, v in DESCRIPTIONS.items() if k in interface.inputs + interface.outputs})


# SDXL's second text encoder (converted with --convert-text-encoder, as Apple's)
convert_text_encoder_2 = partial(convert_text_encoder, component="text_encoder_2")
