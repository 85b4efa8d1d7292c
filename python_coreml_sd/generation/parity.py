"""Parity: the reference backend (original PyTorch modules) against a converted backend, same prompt,
seed and scheduler; PSNR (Apple's definition) per intermediate output and of the final image."""
import numpy as np
from PIL import Image

from ..metrics import psnr
from .pipeline import RESIDUALS_STAGE

# SDXL's runs also record each encoder's penultimate states, the pooled text_embeds and the refiner's first step;
# inpainting runs the masked image's latents (a 4-channel UNet's ControlNet route: the image's); ControlNet runs
# each ControlNet's residuals at the first step (`first_residuals_controlnet_<i>`, before the first noise_pred).
STAGES = ("text_encoder_hidden", "text_encoder_2_hidden", "pooled_embeddings", "text_embeddings",
          "masked_image_latents", "image_latents", RESIDUALS_STAGE, "first_noise_pred", "first_noise_pred_refiner",
          "final_latents", "decoded_image")


def stages_of(intermediates: dict) -> list:
    """The stages a run recorded, in STAGES' order (the ControlNets' residuals in theirs)."""
    found = []
    for stage in STAGES:
        found += [k for k in intermediates if k.startswith(stage)] if stage == RESIDUALS_STAGE else \
            [stage] * (stage in intermediates)
    return found


def compare(reference, converted) -> dict:
    """PSNR of every stage both runs recorded and of the final 8-bit images."""
    values = {stage: psnr(reference.intermediates[stage], converted.intermediates[stage])
              for stage in stages_of(reference.intermediates) if stage in converted.intermediates}
    values["final_image"] = psnr(np.asarray(reference.image, np.float32), np.asarray(converted.image, np.float32))
    return values


def run(reference_pipe, converted_pipe, requests: list, threshold: float) -> dict:
    """The parity report: one entry per request, each with its PSNRs and whether all pass."""
    entries = []
    images = []
    for request in requests:
        ref, out = reference_pipe.generate(request), converted_pipe.generate(request)
        values = compare(ref, out)
        entries.append({"prompt": request.prompt, "seed": request.seed, "scheduler": request.scheduler,
                        "steps": request.num_inference_steps, "psnr_db": values,
                        "passed": all(v >= threshold for v in values.values())})
        images.append((ref.image, out.image))
    return {"threshold_db": threshold, "passed": all(e["passed"] for e in entries), "results": entries}, images


def grid(pairs, amplify: float = 10.0) -> Image.Image:
    """Rows of reference | converted | amplified absolute difference."""
    w, h = pairs[0][0].size
    canvas = Image.new("RGB", (3 * w, h * len(pairs)))
    for row, (ref, out) in enumerate(pairs):
        diff = np.abs(np.asarray(ref, np.float32) - np.asarray(out, np.float32)) * amplify
        for col, image in enumerate((ref, out, Image.fromarray(np.clip(diff, 0, 255).astype(np.uint8)))):
            canvas.paste(image, (col * w, row * h))
    return canvas
