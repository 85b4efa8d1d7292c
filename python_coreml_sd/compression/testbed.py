"""Models to palettize in tests, the benchmark and the mixed-bit pre-analysis.

Converts plain PyTorch modules (a small conv/linear net, a diffusers UNet) to fp16 ML Programs for
iOS 18 (needed for per-grouped-channel LUTs) directly with coremltools, so compression can be
measured without the full converter.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..components import SDXL, TABLE, example_time_ids, text_to_unet_layout, unet_dims
from ..layers.unet import DiffusersUNet
from ..package_io import save_mlmodel

# --config name -> registry family whose UNet architecture it builds (sd15, sdxl: full size)
UNET_CONFIGS = {"tiny": "tiny", "sd15": "sd1", "sdxl": "sdxl"}


class SmallNet(torch.nn.Module):
    """Large weights (palettized) next to small ones (biases, norms, a thin conv: kept fp16)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 64, 3, padding=1)     # 4608 weights
        self.norm = torch.nn.GroupNorm(8, 64)
        self.conv2 = torch.nn.Conv2d(64, 64, 3, padding=1)    # 36864 weights
        self.thin = torch.nn.Conv2d(64, 8, 1)                 # 512 weights: stays fp16
        self.fc = torch.nn.Linear(8 * 8 * 8, 96)              # 49152 weights

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv1(x)))
        h = self.thin(torch.nn.functional.silu(self.conv2(h)))
        return self.fc(h.flatten(1))


def small_net(seed: int = 0):
    torch.manual_seed(seed)
    net = SmallNet().eval()
    inputs = OrderedDict(x=torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(seed + 1)))
    return net, inputs


def unet(config: str = "tiny", seed: int = 0):
    """(wrapped UNet, sample inputs) with weights drawn from ``seed``: tiny's registry
    architecture, or the full-size SD 1.5 or SDXL base architecture."""
    from diffusers import UNet2DConditionModel

    from python_coreml_sd import registry

    if config not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {config!r}; use one of {tuple(UNET_CONFIGS)}")
    arch = registry.family(UNET_CONFIGS[config])["architecture"]
    torch.manual_seed(seed)
    model = DiffusersUNet(UNet2DConditionModel(**arch["unet"]).eval()).eval()
    pooled = arch["text_encoder_2"]["projection_dim"] if "text_encoder_2" in arch else None
    return model, unet_inputs(model.unet.config, 8 if config == "tiny" else 77, seed, text_pooled=pooled)


def unet_inputs(cfg, sequence_length: int, seed: int = 0,
                text_pooled: int = None) -> "OrderedDict[str, torch.Tensor]":
    """Batch-1 sample inputs for a diffusers UNet config: latents, timestep 500, text embeddings in the
    converted UNet's (B, C, 1, S) layout (DiffusersUNet's); an SDXL UNet's also its added conditions, time ids
    and `text_pooled`-wide text_embeds (the component table's shapes)."""
    g = torch.Generator().manual_seed(seed + 1)
    inputs = OrderedDict(
        sample=torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=text_to_unet_layout(torch.randn(1, sequence_length, cfg.cross_attention_dim, generator=g)),
    )
    if text_pooled is not None:
        size = cfg.sample_size
        shapes = TABLE["unet"].input_shapes(unet_dims(dict(cfg), 1, size, size, sequence_length, text_pooled), SDXL)
        inputs["time_ids"] = torch.tensor([example_time_ids(size, size, shapes["time_ids"][1])])
        inputs["text_embeds"] = torch.randn(*shapes["text_embeds"], generator=g)
    return inputs


def convert(module, inputs: "OrderedDict[str, torch.Tensor]", dest, output_name: str = "output") -> Path:
    """Trace ``module`` and save it as an fp16 ML Program (iOS 18) at ``dest``."""
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), tuple(inputs.values()), check_trace=False)
    mlmodel = ct.convert(
        traced, convert_to="mlprogram",
        inputs=[ct.TensorType(name=n, shape=tuple(v.shape), dtype=np.float32) for n, v in inputs.items()],
        outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
        compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    return save_mlmodel(mlmodel, Path(dest), overwrite=True)


def numpy_inputs(inputs) -> dict:
    return {n: v.numpy() for n, v in inputs.items()}
