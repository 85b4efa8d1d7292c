"""Prompt weighting and prompts longer than one text-encoder window, as A1111's web UI reads them.

Syntax: `(words)` weighs words 1.1x, `[words]` 1/1.1x, `(words:1.3)` 1.3x; brackets nest and multiply;
`\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a bracket left open weighs the rest of the
prompt. Weighted words are tokenized fragment by fragment, the token ids split into chunks of 75 with the
begin and end tokens around each (77 positions, the CLIP window), and each chunk encoded on its own; the
chunks' embeddings are concatenated along the sequence. The weights then scale each token's embedding,
and the chunk is rescaled to its unweighted mean (A1111's `EmphasisOriginal`).

Written here because no maintained library does this for Core ML models: compel and A1111 work on
PyTorch text encoders only; the Swift package implements the same rules (golden vectors check both).
"""
import re
from dataclasses import dataclass

import numpy as np

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK_TOKENS = 75  # a 77-token window less its begin and end tokens

# ASCII digits and spaces only (re.ASCII), so that the Swift parser can match it exactly.
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:|\\", re.ASCII)


def parse_weights(text: str) -> list:
    """[(fragment, weight)] in prompt order; neighbours of equal weight merged; never empty."""
    pieces, opened = [], []  # opened: (kind, index into pieces where the bracket opened)
    for match in _TOKENS.finditer(text):
        token, number = match.group(0), match.group(1)
        if token in ("(", "["):
            opened.append((token, len(pieces)))
        elif number is not None and opened and opened[-1][0] == "(":
            _scale(pieces, opened.pop()[1], float(number))
        elif token == ")" and opened and opened[-1][0] == "(":
            _scale(pieces, opened.pop()[1], ROUND)
        elif token == "]" and opened and opened[-1][0] == "[":
            _scale(pieces, opened.pop()[1], SQUARE)
        else:
            pieces.append([token[1:] if token.startswith("\\") and len(token) == 2 else token, 1.0])
    for kind, start in reversed(opened):  # unclosed brackets weigh the rest of the prompt
        _scale(pieces, start, ROUND if kind == "(" else SQUARE)
    return _merged(pieces)


def _scale(pieces: list, start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece[1] *= factor


def _merged(pieces: list) -> list:
    out = []
    for text, weight in pieces:
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        elif text:
            out.append((text, weight))
    return out or [("", 1.0)]


@dataclass
class PromptChunks:
    ids: np.ndarray  # (chunks, 77) token ids with begin, end and padding
    weights: np.ndarray  # (chunks, 77) float32, 1 on begin, end and padding

    @property
    def count(self) -> int:
        return len(self.ids)


def chunk_prompt(tokenizer, text: str, min_chunks: int = 1, window: int = CHUNK_TOKENS + 2) -> PromptChunks:
    """Token ids and weights of a weighted prompt, in windows of `window` tokens (at least `min_chunks`)."""
    ids, weights = [], []
    for fragment, weight in parse_weights(text):
        tokens = tokenizer(fragment, add_special_tokens=False).input_ids if fragment else []
        ids += tokens
        weights += [weight] * len(tokens)
    per_chunk = window - 2
    count = max(min_chunks, -(-len(ids) // per_chunk), 1)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows_ids, rows_weights = [], []
    for k in range(count):
        body = ids[k * per_chunk:(k + 1) * per_chunk]
        body_weights = weights[k * per_chunk:(k + 1) * per_chunk]
        fill = per_chunk - len(body)
        # The end token closes the text and padding follows it, as CLIP tokenizers pad a single window.
        rows_ids.append([bos, *body, eos] + [pad] * fill)
        rows_weights.append([1.0, *body_weights, 1.0] + [1.0] * fill)
    return PromptChunks(np.asarray(rows_ids, np.int64), np.asarray(rows_weights, np.float32))


def padded(chunks: PromptChunks, count: int, tokenizer) -> PromptChunks:
    """`chunks` with empty windows (begin, end, padding; weight 1) appended up to `count` windows."""
    if chunks.count >= count:
        return chunks
    empty = chunk_prompt(tokenizer, "", count - chunks.count, chunks.ids.shape[1])
    return PromptChunks(np.concatenate([chunks.ids, empty.ids]), np.concatenate([chunks.weights, empty.weights]))


def weighted(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One chunk's (1, S, C) embeddings with each token scaled by its weight, then the whole rescaled to the
    unweighted mean (A1111's default emphasis); unchanged when every weight is 1."""
    hidden = np.asarray(hidden, np.float32)
    if np.all(weights == 1):
        return hidden
    scaled = hidden * weights.reshape(1, -1, 1)
    return (scaled * (hidden.mean() / scaled.mean())).astype(np.float32)
