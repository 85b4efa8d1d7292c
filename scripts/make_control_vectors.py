"""Golden ControlNet and inpainting generations for the Swift package (issue 19), from the Python side: the real
python_coreml_sd.generation pipeline run on the closed-form ControlNets, controlled UNet and 9-channel inpainting
UNet (python_coreml_sd/testing/closed_form.py, control_model_set) with the project's CLIP tokenizer.

    python scripts/make_control_vectors.py   # rewrites swift/Tests/StableDiffusionTests/Resources/control_golden.json

Condition images: closed_form.test_image_bytes, the k-th ControlNet's inverted when k is odd; the inpainting start
image is the same picture and the mask white right of column 28 and below row 12. ControlTests (Swift) must compute
the same final latents; tests/test_control_golden_vectors.py fails when this file drifts from what Python computes.
"""
import json
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "control_golden.json"
LATENT_SIZE = 8
SCHEDULERS = {"PNDM": "pndm", "EulerDiscrete": "euler", "DPMSolverMultistep": "dpmpp", "DDIM": "ddim"}
MASK_FROM = (12, 28)  # (row, column): the mask is white (repainted) from both on
CASES = [
    dict(prompt="a lighthouse at dusk", seed=1, steps=5, gains=[0.5], scales=[1.0]),
    dict(prompt="a red fox", negative_prompt="blurry", seed=2, steps=6, gains=[0.5, 0.25], scales=[0.8, 1.5],
         scheduler="EulerDiscrete"),
    dict(prompt="a castle", seed=3, steps=4, gains=[0.3, 0.6], scales=[0.7], scheduler="DDIM", guidance_scale=5.0),
    dict(prompt="a lighthouse at dusk", seed=4, steps=5, inpaint=True, strength=1.0),
    dict(prompt="a red fox", negative_prompt="blurry", seed=5, steps=8, inpaint=True, strength=0.6,
         scheduler="DPMSolverMultistep"),
]
DEFAULTS = dict(negative_prompt="", guidance_scale=7.5, scheduler="PNDM", gains=[], scales=[1.0], inpaint=False,
                strength=None)


def image_bytes(k: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: the closed-form test image, inverted for odd k."""
    from python_coreml_sd.testing.closed_form import test_image_bytes
    data = test_image_bytes(8 * LATENT_SIZE, 8 * LATENT_SIZE)
    return 255 - data if k % 2 else data


def mask():
    from PIL import Image
    size = 8 * LATENT_SIZE
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return Image.fromarray(np.where((rows >= MASK_FROM[0]) & (cols >= MASK_FROM[1]), 255, 0).astype(np.uint8), "L")


def run_case(spec: dict) -> dict:
    from PIL import Image

    from python_coreml_sd.generation.pipeline import GenerationRequest, StableDiffusionPipeline
    from python_coreml_sd.random_models import load_clip_tokenizer
    from python_coreml_sd.testing import closed_form as cf
    case = {**DEFAULTS, **spec}
    models = cf.control_model_set(LATENT_SIZE, case["gains"], case["inpaint"])
    pipe = StableDiffusionPipeline(models, load_clip_tokenizer(), cf.SD_SCHEDULER_CONFIG, progress=False)
    request = GenerationRequest(
        prompt=case["prompt"], negative_prompt=case["negative_prompt"], seed=case["seed"],
        num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], scheduler=case["scheduler"],
        control_image=[Image.fromarray(image_bytes(k)) for k in range(len(case["gains"]))],
        controlnet_scale=tuple(case["scales"]), strength=case["strength"],
        image=Image.fromarray(image_bytes()) if case["inpaint"] else None, mask=mask() if case["inpaint"] else None)
    result = pipe.generate(request)
    rgb = np.asarray(result.image)
    return {**case, "scheduler": SCHEDULERS[case["scheduler"]], "latent_size": LATENT_SIZE,
            "latents": [float(v) for v in result.intermediates["final_latents"].reshape(-1)],
            "rgb_crc32": zlib.crc32(rgb.tobytes()), "rgb_head": [int(v) for v in rgb.reshape(-1)[:48]]}


def build() -> dict:
    from python_coreml_sd.testing import closed_form as cf
    return {"generator": "scripts/make_control_vectors.py", "scheduler_config": cf.SD_SCHEDULER_CONFIG,
            "mask_from": list(MASK_FROM), "cases": [run_case(spec) for spec in CASES]}


def dumps(golden: dict) -> str:
    return json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n"


if __name__ == "__main__":
    GOLDEN.write_text(dumps(build()), encoding="utf-8")
    print(f"wrote {GOLDEN}")
