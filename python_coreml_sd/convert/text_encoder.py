"""CLIP text encoder -> Core ML: `input_ids` (1, S) -> `last_hidden_state` (1, S, D), `pooled_outputs` (1, D)."""
from collections import OrderedDict

import torch

from ..errors import UserError
from ..components import TABLE, Dims
from .common import convert_traced_component, kept_existing, output_path

DESCRIPTIONS = {
    "input_ids": "Token ids of the prompt from the CLIP tokenizer, padded or truncated to the sequence length",
    "last_hidden_state": "Text embeddings that condition the UNet (encoder_hidden_states)",
    "pooled_outputs": "Pooled text embedding (the end-of-text token's hidden state)",
}


class TextEncoderWrapper(torch.nn.Module):
    """Takes float ids (Core ML apps pass float arrays, as Apple's pipelines do) and returns plain tensors."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int32), return_dict=True)
        return out.last_hidden_state, out.pooler_output


def sample_inputs(text_encoder, sequence_length: int) -> "OrderedDict[str, torch.Tensor]":
    generator = torch.Generator().manual_seed(0)
    (shape,) = TABLE["text_encoder"].shapes(Dims(1, 1, sequence=sequence_length))
    ids = torch.randint(0, text_encoder.config.vocab_size, shape, generator=generator)
    ids[0, -1] = text_encoder.config.eos_token_id  # pooling reads the end token
    return OrderedDict(input_ids=ids.to(torch.float32))


def check_options(source, options) -> None:
    """Before any conversion: the sequence length fits the encoder's position embeddings."""
    positions = source.text_positions()
    length = options.text_token_sequence_length
    if length and length > positions:
        raise UserError(f"--text-token-sequence-length {length} exceeds the text encoder's {positions} positions; "
                        f"use at most {positions}")


def convert_text_encoder(source, options) -> list:
    if kept_existing([output_path(options, "text_encoder")], options, "text_encoder"):
        return [output_path(options, "text_encoder")]
    wrapper = TextEncoderWrapper(source.load_text_encoder()).eval()
    length = options.text_token_sequence_length or wrapper.text_encoder.config.max_position_embeddings
    return convert_traced_component(wrapper, sample_inputs(wrapper.text_encoder, length), list(TABLE["text_encoder"].outputs),
                                    options, "text_encoder", DESCRIPTIONS)
