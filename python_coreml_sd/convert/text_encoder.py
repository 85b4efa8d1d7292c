"""CLIP text encoder -> Core ML: `input_ids` (1, S) -> `last_hidden_state` (1, S, D), `pooled_outputs` (1, D)."""
from collections import OrderedDict

import numpy as np
import torch

from .common import check_correctness, compress, describe, log, output_path, save, to_mlprogram, trace

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
    ids = torch.randint(0, text_encoder.config.vocab_size, (1, sequence_length), generator=generator)
    ids[0, -1] = text_encoder.config.eos_token_id  # pooling reads the end token
    return OrderedDict(input_ids=ids.to(torch.float32))


def convert_text_encoder(source, options) -> list:
    out = output_path(options, "text_encoder")
    if out.exists() and not options.overwrite:
        log.info("text_encoder: %s exists, skipping (pass --overwrite to replace it)", out)
        return [out]
    wrapper = TextEncoderWrapper(source.load_text_encoder()).eval()
    length = options.text_token_sequence_length or wrapper.text_encoder.config.max_position_embeddings
    inputs = sample_inputs(wrapper.text_encoder, length)
    traced = trace(wrapper, tuple(inputs.values()))
    mlmodel = to_mlprogram(traced, inputs, list(DESCRIPTIONS)[1:], options)
    describe(mlmodel, options, "text_encoder", DESCRIPTIONS)
    save(compress(mlmodel, options, "text_encoder"), out, options.overwrite)
    if options.check_output_correctness:
        with torch.no_grad():
            reference = dict(zip(list(DESCRIPTIONS)[1:], (t.numpy() for t in wrapper(*inputs.values()))))
        check_correctness(reference, out, {k: v.numpy().astype(np.float32) for k, v in inputs.items()},
                          options.psnr_threshold)
    return [out]
