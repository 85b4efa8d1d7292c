"""Test fixtures: a diffusers model written back as a single-file checkpoint in the original (CompVis /
Stability "LDM") key layout, the inverse of diffusers' single-file conversion, from the known conventions.

SD 1.x text encoders are stored under `cond_stage_model.transformer.text_model.`, SD 2.x ones in
open_clip's layout under `cond_stage_model.model.` (fused q/k/v `in_proj`, `resblocks`, `ln_final`).
SDXL (Stability's SGM layout) keeps the UNet and VAE prefixes, adds the UNet's `label_emb` (diffusers'
`add_embedding`), and stores CLIP ViT-L under `conditioner.embedders.0.transformer.text_model.` and
OpenCLIP bigG in open_clip's layout under `conditioner.embedders.1.model.`, with its real
`text_projection` ([width, projection], the transpose of transformers' Linear weight). diffusers has no
diffusers -> original conversion (its scripts go the other way only for SD 1.x UNets and VAEs), hence
these mappings, written from diffusers' own DIFFUSERS_TO_LDM_MAPPING read in reverse.
"""
import re

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(state: dict, config: dict) -> dict:
    per = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head in UNET_TOP:
            new = f"{UNET_TOP[head]}.{leaf}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.0.{_resnet(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"output_blocks.{per * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{per * int(m[1]) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1])
            new = f"output_blocks.{per * block + per - 1}.{2 if up_has_attention[block] else 1}.conv.{m[2]}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


VAE_TOP = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict, config: dict) -> dict:
    blocks = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif m := re.match(r"(encoder|decoder)\.(conv_norm_out|conv_in|conv_out)\.(.*)", key):
            new = f"{m[1]}.{VAE_TOP[m[2]]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # 1x1 convolutions in the original
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str = "cond_stage_model.transformer.text_model.") -> dict:
    return {prefix + k: v for k, v in state.items()}


OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                   ("self_attn.out_proj", "attn.out_proj"))


def open_clip_to_ldm(state: dict, hidden: int, prefix: str = "cond_stage_model.model.") -> dict:
    """open_clip's layout of a CLIPTextModel state dict; a CLIPTextModelWithProjection's (`text_model.`
    keys, `text_projection.weight`) keeps its projection, SD 2.x's gets the identity."""
    projection = state.get("text_projection.weight")
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"],
           prefix + "text_projection": torch.eye(hidden) if projection is None else projection.T}
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{leaf}"] for p in ("q", "k", "v")])
            for new, old in OPEN_CLIP_LAYER:
                out[dst + f"{old}.{leaf}"] = state[src + f"{new}.{leaf}"]
    return out


def _text_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def xl_text_to_ldm(source) -> dict:
    """SDXL's text encoders in the SGM layout: the base's two (embedders 0 and 1), the refiner's OpenCLIP
    alone (embedders 0)."""
    state = {}
    if source.has("text_encoder"):
        state = clip_to_ldm(_text_state(source.load_text_encoder()), "conditioner.embedders.0.transformer.text_model.")
    second = source.load_text_encoder_2()
    state.update(open_clip_to_ldm(_text_state(second), second.config.hidden_size,
                                  f"conditioner.embedders.{len(state) and 1}.model."))
    return state


def write_checkpoint(source, dest, text_layout: str = "clip", with_vae: bool = True, dtype=None) -> None:
    """Write a ModelSource's UNet, text encoder(s) and VAE as one original-layout .safetensors file;
    text_layout "clip" (SD 1.x), "open_clip" (SD 2.x) or "sdxl" (both of SDXL's encoders)."""
    from safetensors.torch import save_file

    unet = source.load_unet()
    state = unet_to_ldm(unet.state_dict(), dict(unet.config))
    if text_layout == "sdxl":
        state.update(xl_text_to_ldm(source))
    else:
        text = source.load_text_encoder()
        state.update(clip_to_ldm(_text_state(text)) if text_layout == "clip"
                     else open_clip_to_ldm(_text_state(text), text.config.hidden_size))
    if with_vae:
        vae = source.load_vae()
        state.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    save_file(state, str(dest))
