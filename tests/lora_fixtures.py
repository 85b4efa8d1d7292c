"""Test fixtures: LoRA files for a model (diffusers/PEFT format and kohya's), and textual-inversion
embeddings, drawn from fixed seeds."""
import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _pairs(model, targets, rank, generator, scale=0.5):
    """{module name: (down [rank, in], up [out, rank])} for every Linear whose name ends in a target."""
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale / rank ** 0.5
            pairs[name] = (down, up)
    return pairs


def lora_pairs(source, rank=4, seed=0, text=True):
    generator = torch.Generator().manual_seed(seed)
    pairs = {"unet": _pairs(source.load_unet(), UNET_TARGETS, rank, generator)}
    for encoder in ("text_encoder", "text_encoder_2") if text else ():  # SDXL has both
        if source.has(encoder):
            pairs[encoder] = _pairs(getattr(source, f"load_{encoder}")(), TEXT_TARGETS, rank, generator)
    return pairs


KOHYA_PREFIXES = {False: {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"},
                  True: {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_",
                         "text_encoder_2": "lora_te2_text_model_"}}


def write_peft_lora(pairs, dest) -> None:
    """diffusers' own format (save_lora_weights): `unet.<module>.lora_A.weight` / `lora_B.weight`."""
    from safetensors.torch import save_file
    state = {}
    for component, modules in pairs.items():
        for name, (down, up) in modules.items():
            state[f"{component}.{name}.lora_A.weight"] = down.contiguous()
            state[f"{component}.{name}.lora_B.weight"] = up.contiguous()
    save_file(state, str(dest))


def write_kohya_lora(pairs, dest, alpha=None) -> None:
    """kohya-ss / AUTOMATIC1111: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
    SDXL's text encoders are `lora_te1_` and `lora_te2_`."""
    from safetensors.torch import save_file
    xl = "text_encoder_2" in pairs
    state = {}
    for component, modules in pairs.items():
        for name, (down, up) in modules.items():
            key = KOHYA_PREFIXES[xl][component] + name.removeprefix("text_model.").replace(".", "_")
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    save_file(state, str(dest))


def write_xl_embedding(dest, widths=(32, 64), vectors=1, seed=0) -> None:
    """SDXL's format: `clip_l` (the first text encoder's width) and `clip_g` (the second's), [vectors, width]."""
    from safetensors.torch import save_file
    generator = torch.Generator().manual_seed(seed)
    save_file({key: torch.randn(vectors, width, generator=generator) for key, width in zip(("clip_l", "clip_g"), widths)},
              str(dest))


def write_embedding(dest, width, vectors=1, seed=0, token=None, a1111=False) -> None:
    from safetensors.torch import save_file
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(vectors, width, generator=generator)
    if a1111:
        save_file({"emb_params": values}, str(dest))
    else:
        save_file({token or "<concept>": values[0] if vectors == 1 else values}, str(dest))
