"""The one random source every backend shares, so a seed gives the same picture everywhere.

Initial latents and img2img noise come from NumPy's legacy Mersenne Twister,
`np.random.RandomState(seed).randn(...)`, drawn in this order: latents (text-to-image) or
diagonal_noise then noise (img2img); inpainting then draws the masked image's posterior noise (after the
latents at strength 1, after img2img's two otherwise); the ControlNet inpaint route (a 4-channel UNet) at strength
1 draws the image's posterior noise after the latents (below 1 it reuses img2img's). The Swift package reproduces this stream bit for bit.
Ancestral schedulers draw their per-step noise from `torch.Generator().manual_seed(seed)` on the CPU.
"""
import numpy as np
import torch

MAX_SEED = 2**32 - 1  # RandomState takes seeds in 0..2**32 - 1


class RandomSource:
    def __init__(self, seed: int):
        self.seed = seed
        self._state = np.random.RandomState(seed)

    def normal(self, shape) -> np.ndarray:
        return self._state.randn(*shape).astype(np.float32)

    def torch_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)
