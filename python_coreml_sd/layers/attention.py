"""Multi-head attention on (B, C, 1, S) activations in three layouts.

ORIGINAL: one batched matmul over all heads (what GPUs like).
SPLIT_EINSUM: one small einsum per head, keys laid out (B, S_k, 1, C) so that no op needs a transpose
    of a rank-4 tensor whose last axis is large (what the Neural Engine of iOS 16 / macOS 13 likes).
SPLIT_EINSUM_V2: SPLIT_EINSUM with the query sequence also cut into chunks, which keeps each softmax
    and its attention-weight tensor small enough for the Neural Engine of iOS 17 / macOS 14 to keep
    on chip for large latents. A package of one latent size cuts each sequence in chunks of
    DEFAULT_QUERY_CHUNK queries (the last one shorter); a package of several sizes (Core ML enumerated
    shapes) runs one program for all of them, so each attention layer cuts its queries in the same number
    of equal chunks at every size (`shared_query_chunks`), by a reshape that needs no size of the sequence.
"""
import math
from functools import reduce

import torch
from torch import nn

ATTENTION_IMPLEMENTATIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
DEFAULT_QUERY_CHUNK = 512


def batched_attention(q, k, v, heads: int):
    b, c, _, sq = q.shape
    dh = c // heads
    mh_q = q.view(b, heads, dh, sq)
    mh_k = k.view(b, heads, dh, -1)
    mh_v = v.view(b, heads, dh, -1)
    weights = torch.matmul(mh_q.transpose(2, 3), mh_k).softmax(dim=3)  # (b, h, sq, sk)
    out = torch.matmul(mh_v, weights.transpose(2, 3))  # (b, h, dh, sq)
    return out.reshape(b, c, 1, sq)


def _one_head(q_h, k_h, v_h):
    # q_h (b, dh, 1, sq), k_h (b, sk, 1, dh), v_h (b, dh, 1, sk)
    weights = torch.einsum("bchq,bkhc->bkhq", q_h, k_h).softmax(dim=1)
    return torch.einsum("bkhq,bchk->bchq", weights, v_h)


def shared_query_chunks(lengths, chunk: int = DEFAULT_QUERY_CHUNK):
    """The number of equal query chunks one attention layer can use at every one of its sequence `lengths`
    (one per latent size): the fewest that divide every length and leave no chunk over `chunk` queries
    (1: no cutting, when no length exceeds it); None when no such number exists."""
    need, common = -(-max(lengths) // chunk), reduce(math.gcd, lengths)
    return next((n for n in range(need, common + 1) if common % n == 0), None)


def _equal_query_chunks(q_h, count: int):
    """(b, dh, n, S / n) -> n tensors (b, dh, 1, S / n), chunk i holding queries i * S / n ... (the layout of
    a reshape of (b, dh, 1, S)): the split of an axis of constant size, which a program of enumerated shapes
    can hold (a split of the sequence axis needs its size when converted)."""
    return q_h.split(1, dim=2) if count > 1 else (q_h,)


def split_einsum_attention(q, k, v, heads: int, query_chunk: int = None, query_chunks: int = None):
    """`query_chunk`: cut queries in chunks of that many (SPLIT_EINSUM_V2 at one latent size); `query_chunks`:
    in that many equal chunks instead (SPLIT_EINSUM_V2 at several, `shared_query_chunks`)."""
    dh = q.shape[1] // heads
    if query_chunks and query_chunks > 1:  # one reshape for all heads: (b, c, 1, S) -> (b, c, n, S / n)
        q = q.reshape(q.shape[0], q.shape[1], query_chunks, -1)
    # One split op per tensor rather than a slice per head: a full-size UNet has 128 attention layers,
    # and conversion passes cost time in the number of ops.
    q_heads = q.split(dh, dim=1)
    k_heads = k.transpose(1, 3).split(dh, dim=3)  # (b, sk, 1, dh) each: one transpose for all heads
    v_heads = v.split(dh, dim=1)
    outputs = []
    for q_h, k_h, v_h in zip(q_heads, k_heads, v_heads):
        if query_chunks:
            outputs.append(torch.cat([_one_head(q_c, k_h, v_h) for q_c in _equal_query_chunks(q_h, query_chunks)],
                                     dim=3))
        elif query_chunk and q.shape[3] > query_chunk:
            outputs.append(torch.cat([_one_head(q_c, k_h, v_h) for q_c in q_h.split(query_chunk, dim=3)], dim=3))
        else:
            outputs.append(_one_head(q_h, k_h, v_h))
    return torch.cat(outputs, dim=1)


class CrossAttention(nn.Module):
    """diffusers' Attention (to_q/to_k/to_v without bias, to_out.0 with bias) as 1x1 convolutions; loads
    its state_dict once linear weights are reshaped (see unet.reshape_linear_weights)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int,
                 implementation: str = "SPLIT_EINSUM", query_chunk: int = DEFAULT_QUERY_CHUNK,
                 query_chunks: dict = None):
        """`query_chunks` (SPLIT_EINSUM_V2 at several latent sizes): {query sequence length at the traced size:
        number of equal chunks}; a length it lacks is cut in chunks of `query_chunk` (the same values)."""
        super().__init__()
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {implementation!r}")
        inner = heads * dim_head
        self.heads, self.implementation, self.query_chunk = heads, implementation, query_chunk
        self.query_chunks = query_chunks or {}
        self.scale = 1.0 / math.sqrt(dim_head)
        self.to_q = nn.Conv2d(query_dim, inner, 1, bias=False)
        self.to_k = nn.Conv2d(context_dim, inner, 1, bias=False)
        self.to_v = nn.Conv2d(context_dim, inner, 1, bias=False)
        self.to_out = nn.ModuleList([nn.Conv2d(inner, query_dim, 1), nn.Identity()])

    def forward(self, x, context=None):
        context = x if context is None else context
        # Scaling q (S x d values) is cheaper than scaling the S x S_k weights and identical in exact math.
        q = self.to_q(x) * self.scale
        k, v = self.to_k(context), self.to_v(context)
        if self.implementation == "ORIGINAL":
            out = batched_attention(q, k, v, self.heads)
        else:
            v2 = self.implementation == "SPLIT_EINSUM_V2"
            # int(): under torch.jit.trace a size is a 0-d tensor, which no dict key equals
            chunks = self.query_chunks.get(int(q.shape[3])) if v2 and self.query_chunks else None
            chunk = self.query_chunk if v2 else None
            out = split_einsum_attention(q, k, v, self.heads, chunk, chunks)
        return self.to_out[0](out)
