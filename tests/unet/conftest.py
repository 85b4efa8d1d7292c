"""Shared fixtures: the tiny and an SD 2.x-like small diffusers UNet, as modules and as model folders."""
import json

import pytest
import torch

from python_coreml_sd import registry
from python_coreml_sd.model_sources import ModelSource


def tiny_config() -> dict:
    return registry.family("tiny")["architecture"]["unet"]


def sd2_like_config() -> dict:
    """SD 2.x block options at toy width: linear projections, per-block head counts, 2 layers per block."""
    config = tiny_config()
    config.update(use_linear_projection=True, attention_head_dim=[2, 4, 4], cross_attention_dim=48,
                  layers_per_block=2, upcast_attention=True)
    return config


CONFIGS = {"tiny": tiny_config, "sd2_like": sd2_like_config}


def build_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def unets() -> dict:
    return {name: build_unet(make()) for name, make in CONFIGS.items()}


@pytest.fixture(scope="session")
def sources(tmp_path_factory, unets) -> dict:
    """Model folders holding only a UNet (what convert_unet needs), one per config."""
    result = {}
    for name, unet in unets.items():
        root = tmp_path_factory.mktemp(f"model_{name}")
        unet.save_pretrained(str(root / "unet"))
        (root / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
        result[name] = ModelSource(name, root)
    return result
