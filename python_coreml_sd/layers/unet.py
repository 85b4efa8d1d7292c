"""A Neural-Engine-friendly UNet that loads a diffusers UNet2DConditionModel's state_dict unchanged.

Transformer blocks run in the (B, C, 1, S) layout with 1x1 convolutions for every linear layer; resnets,
up/down sampling and the time embedding keep diffusers' math. Supported: SD 1.x (conv projections) and
SD 2.x (linear projections, per-block head counts) block types, and SDXL's (transformer depth per block,
the `text_time` added conditions: time ids and pooled text embeddings).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..components import text_from_unet_layout
from ..errors import UserError
from .attention import DEFAULT_QUERY_CHUNK, CrossAttention, shared_query_chunks
from .layer_norm import LayerNormANE

DOWN_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D"}
UP_BLOCKS = {"UpBlock2D", "CrossAttnUpBlock2D"}
# Config keys whose non-default values change the math in ways this UNet does not implement.
REQUIRED_DEFAULTS = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False, "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "act_fn": "silu", "encoder_hid_dim": None,
    "attention_type": "default", "mid_block_scale_factor": 1, "downsample_padding": 1,
    "cross_attention_norm": None, "mid_block_only_cross_attention": None,
}


ADDITION_EMBED_TYPES = (None, "text_time")  # none (SD 1.x / 2.x) or SDXL's


def check_supported(config: dict) -> None:
    unsupported = [f"{k}={config[k]!r}" for k, default in REQUIRED_DEFAULTS.items()
                   if k in config and config[k] != default]
    if config.get("addition_embed_type") not in ADDITION_EMBED_TYPES:
        unsupported.append(f"addition_embed_type={config['addition_embed_type']!r}")
    unsupported += [f"block {b!r}" for b in config.get("down_block_types", []) if b not in DOWN_BLOCKS]
    unsupported += [f"block {b!r}" for b in config.get("up_block_types", []) if b not in UP_BLOCKS]
    if unsupported:
        raise UserError("this UNet2DConditionModel is not supported by the Core ML UNet converter ("
                        + ", ".join(unsupported) + "); supported: SD 1.x, 2.x and SDXL UNets with the block types "
                        + ", ".join(sorted(DOWN_BLOCKS | UP_BLOCKS)))


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


class FeedForward(nn.Module):
    """diffusers' GEGLU feed-forward: `net.0.proj`, `net.2` (net.1 is dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        geglu = nn.Module()
        geglu.proj = conv1x1(dim, inner * 2)
        self.net = nn.ModuleList([geglu, nn.Identity(), conv1x1(inner, dim)])

    def forward(self, x):
        hidden, gate = self.net[0].proj(x).chunk(2, dim=1)
        return self.net[2](hidden * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, attention: dict):
        super().__init__()
        dim_head = dim // heads
        self.norm1 = LayerNormANE(dim)
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, **attention)
        self.norm2 = LayerNormANE(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **attention)
        self.norm3 = LayerNormANE(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """proj_in/proj_out are 1x1 convs for both projection kinds: a linear over channels applied at every
    position is the same map, so SD 2.x linear weights load after a reshape."""

    def __init__(self, channels: int, context_dim: int, heads: int, layers: int, groups: int, attention: dict):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = conv1x1(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, heads, attention) for _ in range(layers)])
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x)).view(b, c, 1, h * w)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        return self.proj_out(hidden.view(b, c, h, w)) + x


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = conv1x1(temb_channels, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = conv1x1(cin, cout) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with attentions) or DownBlock2D (without)."""

    def __init__(self, cin, cout, temb, layers, groups, eps, downsample, transformer=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, temb, groups, eps) for i in range(layers)])
        if transformer is not None:
            self.attentions = nn.ModuleList([Transformer2D(cout, groups=groups, **transformer) for _ in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x, temb, context):
        states = []
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attention in zip(self.resnets, attentions):
            x = resnet(x, temb)
            if attention is not None:
                x = attention(x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with attentions) or UpBlock2D (without)."""

    def __init__(self, cin, cprev, cout, temb, layers, groups, eps, upsample, transformer=None):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((cprev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout, temb, groups, eps)
            for i in range(layers)])
        if transformer is not None:
            self.attentions = nn.ModuleList([Transformer2D(cout, groups=groups, **transformer) for _ in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x, skips: list, temb, context):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attention in zip(self.resnets, attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if attention is not None:
                x = attention(x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, temb, groups, eps, transformer):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(channels, groups=groups, **transformer)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = conv1x1(cin, dim)
        self.linear_2 = conv1x1(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def sinusoidal_embedding(timestep, channels: int, flip_sin_to_cos: bool, freq_shift: float):
    """diffusers' get_timestep_embedding, returned as (B, channels, 1, 1)."""
    half = channels // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timestep.device) * (-math.log(10000.0) / (half - freq_shift))
    args = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    if channels % 2:
        emb = F.pad(emb, (0, 1))
    return emb[:, :, None, None]


def reshape_linear_weights(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Turn (out, in) linear weights into the (out, in, 1, 1) weights of the 1x1 convs that replace them."""
    own = module.state_dict()
    for key, value in list(state_dict.items()):
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in own and value.dim() == 2 and own[name].dim() == 4:
            state_dict[key] = value[:, :, None, None]


class UNet2DConditionModelANE(nn.Module):
    """forward(sample (B,4,H,W), timestep (B,), encoder_hidden_states (B, C, 1, S)) -> noise_pred; SDXL's UNets
    (addition_embed_type "text_time") also take time_ids (B, N) and text_embeds (B, P)."""

    def __init__(self, config: dict, attention_implementation: str = "SPLIT_EINSUM",
                 query_chunk: int = DEFAULT_QUERY_CHUNK, query_chunks: dict = None):
        """`query_chunks`: SPLIT_EINSUM_V2's equal query chunks at several latent sizes (`query_chunk_plan`)."""
        super().__init__()
        check_supported(config)
        self.config = dict(config)
        channels = list(config["block_out_channels"])
        n = len(channels)
        groups, eps = config.get("norm_num_groups", 32), config.get("norm_eps", 1e-5)
        heads = _per_block(config.get("num_attention_heads") or config["attention_head_dim"], n)
        depth = _per_block(config.get("transformer_layers_per_block", 1), n)
        layers = config.get("layers_per_block", 2)
        temb = channels[0] * 4
        attention = {"implementation": attention_implementation, "query_chunk": query_chunk,
                     "query_chunks": query_chunks}

        def transformer(i):
            return {"context_dim": config["cross_attention_dim"], "heads": heads[i], "layers": depth[i],
                    "attention": attention}

        self.conv_in = nn.Conv2d(config.get("in_channels", 4), channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        if config.get("addition_embed_type") == "text_time":  # SDXL: diffusers' add_time_proj (no weights)
            self.add_embedding = TimestepEmbedding(config["projection_class_embeddings_input_dim"], temb)
        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], temb, layers, groups, eps, i < n - 1,
                      transformer(i) if kind == "CrossAttnDownBlock2D" else None)
            for i, kind in enumerate(config["down_block_types"])])
        self.mid_block = MidBlock(channels[-1], temb, groups, eps, transformer(n - 1))
        rev = channels[::-1]
        self.up_blocks = nn.ModuleList([  # the down blocks' settings, mirrored
            UpBlock(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb, layers + 1, groups, eps, i < n - 1,
                    transformer(n - 1 - i) if kind == "CrossAttnUpBlock2D" else None)
            for i, kind in enumerate(config["up_block_types"])])
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], config.get("out_channels", 4), 3, padding=1)
        self._register_load_state_dict_pre_hook(self._pre_hook)

    def _pre_hook(self, state_dict, prefix, *args):
        reshape_linear_weights(self, state_dict, prefix)

    def forward(self, sample, timestep, encoder_hidden_states, time_ids=None, text_embeds=None, residuals=()):
        """`residuals`: a ControlNet's, added to the skip states and to the mid block's output (diffusers'
        down_block_additional_residuals and mid_block_additional_residual)."""
        flip, shift = self.config.get("flip_sin_to_cos", True), self.config.get("freq_shift", 0)
        t = sinusoidal_embedding(timestep.expand(sample.shape[0]), self.config["block_out_channels"][0], flip, shift)
        temb = self.time_embedding(t.to(sample.dtype))
        if hasattr(self, "add_embedding"):
            temb = temb + self.add_embedding(self.added_conditions(time_ids, text_embeds, flip, shift).to(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states)
            skips.extend(states)
        if residuals:
            skips = [skip + residual for skip, residual in zip(skips, residuals[:-1], strict=True)]
        x = self.mid_block(x, temb, encoder_hidden_states)
        if residuals:
            x = x + residuals[-1]
        for block in self.up_blocks:
            x = block(x, skips, temb, encoder_hidden_states)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def added_conditions(self, time_ids, text_embeds, flip, shift):
        """SDXL's: each time id's sinusoidal embedding, concatenated after the pooled text embeddings,
        (B, P + N * D, 1, 1), as diffusers' add_time_proj and concat."""
        batch = text_embeds.shape[0]
        times = sinusoidal_embedding(time_ids.reshape(-1), self.config["addition_time_embed_dim"], flip, shift)
        return torch.cat([text_embeds[:, :, None, None].float(), times.reshape(batch, -1, 1, 1)], dim=1)


class ControlledUNetANE(UNet2DConditionModelANE):
    """The UNet taking a ControlNet's residuals as positional inputs after its own (what tracing needs; Apple's
    additional_residual_0, ...: `components.residual_shapes`), after SDXL's time_ids and text_embeds for SDXL's."""

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added, residuals = _added_and_rest(self, rest)
        return super().forward(sample, timestep, encoder_hidden_states, **(added or {}), residuals=residuals)


def attention_levels(config: dict) -> list:
    """The resolution levels (0: the latent's, i: 2**i times smaller) holding attention: each cross-attention
    down block's (its up block mirrors it) and the mid block's, at the last level."""
    last = len(config["block_out_channels"]) - 1
    return sorted({i for i, kind in enumerate(config["down_block_types"]) if kind == "CrossAttnDownBlock2D"} | {last})


def query_chunk_plan(config: dict, sizes, chunk: int = DEFAULT_QUERY_CHUNK) -> dict:
    """SPLIT_EINSUM_V2 at several latent `sizes` (the first the traced one): {level: (its query sequence length
    at the first size, the number of equal chunks every size can share, or None where none can)}. Each level
    halves both sides (diffusers' downsampling convolutions: stride 2, padding 1, on even sides)."""
    plan = {}
    for level in attention_levels(config):
        lengths = [(h >> level) * (w >> level) for h, w in sizes]
        plan[level] = (lengths[0], shared_query_chunks(lengths, chunk))
    return plan


def from_diffusers(unet, attention_implementation: str = "SPLIT_EINSUM",
                   query_chunk: int = DEFAULT_QUERY_CHUNK, controlled: bool = False) -> UNet2DConditionModelANE:
    """The Neural-Engine UNet holding a diffusers UNet2DConditionModel's own tensors (strict; built on the
    meta device and assigned: no copy, no random initialisation). The converter and the tests use this;
    `controlled`: the ControlledUNetANE (same weights)."""
    with torch.device("meta"):
        model = (ControlledUNetANE if controlled else UNet2DConditionModelANE)(
            dict(unet.config), attention_implementation, query_chunk)
    model.load_state_dict(unet.state_dict(), strict=True, assign=True)
    return model.eval().requires_grad_(False)


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DConditionModel behind the converted UNet's interface: positional inputs (what tracing
    needs), encoder_hidden_states in the (B, C, 1, S) layout, SDXL's added conditions as two more inputs
    (diffusers' added_cond_kwargs), noise_pred as a plain tensor. The PyTorch reference of the UNet component,
    and the plain path the benchmarks trace."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, time_ids=None, text_embeds=None):
        states = text_from_unet_layout(encoder_hidden_states)
        added = {"time_ids": time_ids, "text_embeds": text_embeds} if time_ids is not None else None
        return self.unet(sample, timestep, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[0]


class DiffusersControlledUNet(DiffusersUNet):
    """A diffusers UNet behind the controlled UNet's interface: a ControlNet's residuals as positional inputs
    after the UNet's own (diffusers' down_block_additional_residuals, then mid_block_additional_residual)."""

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added, residuals = _added_and_rest(self.unet, rest)
        return self.unet(sample, timestep, encoder_hidden_states=text_from_unet_layout(encoder_hidden_states),
                         added_cond_kwargs=added, down_block_additional_residuals=residuals[:-1],
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


def _added_and_rest(model, inputs: tuple) -> tuple:
    """(SDXL's added_cond_kwargs or None, the inputs after them): an SDXL model (`text_time` added embedding) takes
    time_ids and text_embeds first, as the component table's SDXL ControlNet interfaces order them."""
    if model.config.get("addition_embed_type") != "text_time":
        return None, inputs
    return {"time_ids": inputs[0], "text_embeds": inputs[1]}, inputs[2:]


class DiffusersControlNet(nn.Module):
    """A diffusers ControlNetModel behind the converted ControlNet's interface (sample, timestep,
    encoder_hidden_states in the (B, C, 1, S) layout, controlnet_cond in [0, 1]) -> its residuals as one flat
    tuple, down blocks' then the mid block's (Apple's additional_residual_0, ...). Converter and reference."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        """`rest`: controlnet_cond, after SDXL's time_ids and text_embeds for an SDXL ControlNet."""
        added, (controlnet_cond,) = _added_and_rest(self.controlnet, rest)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=text_from_unet_layout(encoder_hidden_states),
                                    controlnet_cond=controlnet_cond, added_cond_kwargs=added, return_dict=False)
        return (*down, mid)
