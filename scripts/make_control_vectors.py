"""Golden ControlNet and inpainting generations for the Swift package (issue 19), from the Python side: the real
python_coreml_sd.generation pipeline run on the closed-form ControlNets, controlled UNet and 9-channel inpainting
UNet (python_coreml_sd/testing/closed_form.py, control_model_set) with the project's CLIP tokenizer; for SDXL
(issue 19's Swift part) this script's xl_control_model_set (closed-form SDXL ControlNets reading the added conditions,
their controlled base UNet, a 9-channel SDXL UNet) with tiny-xl's two tokenizers; and the ControlNet inpaint route
(a mask with a 4-channel controlled UNet) for both families.

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
    # SDXL (xl_control_model_set): the ControlNets take the added conditions too; force_zeros_for_empty_prompt on
    dict(family="sdxl", prompt="a lighthouse at dusk", seed=21, steps=5, gains=[0.5], scales=[1.0],
         scheduler="EulerDiscrete"),
    dict(family="sdxl", prompt="a red fox", negative_prompt="blurry", seed=22, steps=6, gains=[0.5, 0.25],
         scales=[0.8, 1.5], scheduler="DPMSolverMultistep", original_size=[96, 64], crops_coords_top_left=[8, 16]),
    # SDXL inpainting (a 9-channel base UNet): SDXL's default strength 0.9999 (None here), then from noise alone
    dict(family="sdxl", prompt="a lighthouse at dusk", seed=23, steps=5, inpaint=True, scheduler="EulerDiscrete"),
    dict(family="sdxl", prompt="a red fox", negative_prompt="blurry", seed=24, steps=6, inpaint=True, strength=1.0,
         scheduler="DPMSolverMultistep"),
    # The ControlNet inpaint route (a mask with a 4-channel controlled UNet, blended after each step): an inpaint
    # ControlNet steered by the masked image (no condition image; strength 1, from noise), two ControlNets with their
    # images at strength 0.6, and SDXL's (its default strength 0.9999: from the image noised)
    dict(prompt="a lighthouse at dusk", seed=31, steps=5, gains=[0.5], masked=True, inpaint_controlnet=True),
    dict(prompt="a red fox", negative_prompt="blurry", seed=32, steps=8, gains=[0.5, 0.25], scales=[1.0, 0.5],
         masked=True, strength=0.6, scheduler="EulerDiscrete"),
    dict(family="sdxl", prompt="a castle", seed=33, steps=5, gains=[0.5], masked=True, inpaint_controlnet=True,
         scheduler="EulerDiscrete"),
]
DEFAULTS = dict(family="sd", negative_prompt="", guidance_scale=7.5, scheduler="PNDM", gains=[], scales=[1.0],
                inpaint=False, strength=None, original_size=None, crops_coords_top_left=[0, 0], masked=False,
                inpaint_controlnet=False)
XL_SCALE = 0.13025  # SDXL's vae_scaling_factor


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


def xl_control_model_set(gains=(), inpaint: bool = False):
    """closed_form.xl_model_set (no refiner) with SDXL ControlNets of `gains` and the controlled base UNet, or with a
    9-channel SDXL inpainting UNet: closed_form's ControlNet formulas plus the added conditions (time ids, pooled
    embeds) as denoise_xl reads them. ClosedFormXLControl in the Swift stand-ins is the same."""
    from dataclasses import replace

    from python_coreml_sd.components import RESIDUAL, SDXL, TABLE, Dims, text_from_unet_layout
    from python_coreml_sd.generation.components import Component, controlnet_key
    from python_coreml_sd.testing import closed_form as cf
    models = cf.xl_model_set(LATENT_SIZE, refiner=False)
    dims = replace(Dims(LATENT_SIZE, LATENT_SIZE, text_hidden=sum(cf.XL_WIDTHS.values()), text_pooled=cf.XL_POOLED,
                        inpaint=inpaint), residuals=((4, LATENT_SIZE, LATENT_SIZE), (4, 1, 1)))
    names = (RESIDUAL.format(0), RESIDUAL.format(1))
    gain = cf.XL_GAINS["unet"]

    def extra(time_ids, text_embeds) -> float:  # denoise_xl's
        positional = 0.0
        for k, value in enumerate(np.asarray(time_ids).reshape(-1)):
            positional += (k + 1) * float(value)
        return 1e-4 * positional + 0.02 * cf.embedding_mean(np.asarray(text_embeds))

    def per_item(compute, inputs, *more):
        hidden = text_from_unet_layout(inputs["encoder_hidden_states"])
        return [compute(x, float(t), h, ids, e, *rest) for x, t, h, ids, e, *rest in
                zip(inputs["sample"], inputs["timestep"], hidden, inputs["time_ids"], inputs["text_embeds"],
                    *(inputs[name] for name in more))]

    def inpaint_denoise(sample, t, hidden, ids, embeds):
        return (cf.denoise_xl(sample[:4], t, hidden, ids, embeds, gain) + np.float32(0.1) * sample[4:5]
                + np.float32(0.05) * sample[5:])

    def controlled_denoise(sample, t, hidden, ids, embeds, first, second):
        return cf.denoise_xl(sample, t, hidden, ids, embeds, gain) + np.float32(0.5) * first + np.float32(0.1) * second

    def residuals(sample, t, hidden, ids, embeds, cond, net_gain):
        first, second = cf.control_residuals(sample, t, hidden, cond, net_gain)
        return first, (second + np.float32(extra(ids, embeds))).astype(np.float32)

    if inpaint:
        unet = lambda inputs: {"noise_pred": np.stack(per_item(inpaint_denoise, inputs))}
        models.components["unet"] = Component(cf._Model(unet), TABLE["unet"].input_shapes(dims, SDXL))
        return models
    controlled = lambda inputs: {"noise_pred": np.stack(per_item(controlled_denoise, inputs, *names))}
    models.components["unet"] = Component(cf._Model(controlled), TABLE["control-unet"].input_shapes(dims, SDXL))
    for i, net_gain in enumerate(gains):
        def net(inputs, net_gain=net_gain):
            items = per_item(lambda *args: residuals(*args, net_gain), inputs, "controlnet_cond")
            return {name: np.stack([item[k] for item in items]) for k, name in enumerate(names)}
        models.components[controlnet_key(i)] = Component(cf._Model(net), TABLE["controlnet"].input_shapes(dims, SDXL))
    return models


def xl_tokenizers() -> tuple:
    """tiny-xl's tokenizers: the project's CLIP files, the second padding with "!" (make_sdxl_vectors.py's)."""
    from python_coreml_sd import registry
    from python_coreml_sd.random_models import load_clip_tokenizer
    pads = [registry.family("tiny-xl")["architecture"][name]["pad_token"] for name in ("tokenizer", "tokenizer_2")]
    return tuple(load_clip_tokenizer(pad) for pad in pads)


def run_case(spec: dict) -> dict:
    from PIL import Image

    from python_coreml_sd.generation.pipeline import GenerationRequest, StableDiffusionPipeline
    from python_coreml_sd.random_models import load_clip_tokenizer
    from python_coreml_sd.testing import closed_form as cf
    case = {**DEFAULTS, **spec}
    masked = case["inpaint"] or case["masked"]  # a 9-channel UNet, or the ControlNet route's 4-channel one
    if case["family"] == "sdxl":
        tokenizer, tokenizer_2 = xl_tokenizers()
        pipe = StableDiffusionPipeline(xl_control_model_set(case["gains"], case["inpaint"]), tokenizer,
                                       cf.SD_SCHEDULER_CONFIG, vae_scaling_factor=XL_SCALE, progress=False,
                                       tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True)
    else:
        models = cf.control_model_set(LATENT_SIZE, case["gains"], case["inpaint"])
        pipe = StableDiffusionPipeline(models, load_clip_tokenizer(), cf.SD_SCHEDULER_CONFIG, progress=False)
    request = GenerationRequest(
        prompt=case["prompt"], negative_prompt=case["negative_prompt"], seed=case["seed"],
        num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], scheduler=case["scheduler"],
        control_image=[] if case["inpaint_controlnet"] else [Image.fromarray(image_bytes(k))
                                                             for k in range(len(case["gains"]))],
        controlnet_scale=tuple(case["scales"]), strength=case["strength"],
        image=Image.fromarray(image_bytes()) if masked else None, mask=mask() if masked else None,
        original_size=case["original_size"], crops_coords_top_left=tuple(case["crops_coords_top_left"]))
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
