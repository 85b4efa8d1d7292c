"""Golden SDXL generations for the Swift package's SDXL pipeline (issue 16), from the Python side: the real
python_coreml_sd.generation pipeline run on the closed-form SDXL models (python_coreml_sd/testing/closed_form.py,
xl_model_set) with tiny-xl's two tokenizers (one CLIP vocabulary; the second pads with "!") and scheduler config.

    python scripts/make_sdxl_vectors.py   # rewrites swift/Tests/StableDiffusionTests/Resources/sdxl_golden.json

Each case holds the request, the conditioning the pipeline gives the UNet (both encoders' states side by side,
the pooled text_embeds, the time ids; with --refiner-start also the refiner's) and the final latents and pixels;
img2img cases (`strength`) start from closed_form.test_image.
SDXLTests (Swift) must compute the same; tests/test_sdxl_golden_vectors.py fails when this file drifts from what
Python computes now.
"""
import json
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "sdxl_golden.json"
LATENT_SIZE = 8
# The Python pipeline's scheduler names -> the Swift package's (SchedulerKind)
SCHEDULERS = {"EulerDiscrete": "euler", "DPMSolverMultistep": "dpmpp"}
LONG_PROMPT = " ".join(["a", "photo", "of", "(red:1.2)", "fox", "in", "the", "snow"] * 12)  # 96 tokens: 2 windows
CASES = [
    dict(prompt="a lighthouse at dusk", seed=1, steps=6),
    dict(prompt="a lighthouse at dusk", negative_prompt="blurry, low quality", seed=2, steps=6, guidance_scale=5.0),
    dict(prompt="a castle", seed=3, steps=5, original_size=(64, 96), crops_coords_top_left=(8, 16),
         target_size=(256, 256)),
    dict(prompt="a castle", seed=4, steps=5, force_zeros_for_empty_prompt=False),
    dict(prompt="a red fox", negative_prompt="blurry", seed=5, steps=8, refiner_start=0.5),
    dict(prompt="a red fox", seed=6, steps=10, scheduler="DPMSolverMultistep", refiner_start=0.7, aesthetic_score=7.0,
         negative_aesthetic_score=2.0),
    dict(prompt="a (red:1.3) fox in [dark] woods", negative_prompt="(ugly:1.2)", seed=7, steps=6),
    dict(prompt=LONG_PROMPT, negative_prompt="blurry", seed=8, steps=4, max_prompt_chunks=2),
    dict(prompt=LONG_PROMPT, seed=9, steps=4, max_prompt_chunks=2, refiner_start=0.5),
    dict(prompt="a lighthouse at dusk", seed=10, steps=10, strength=0.6),  # img2img from closed_form.test_image
    dict(prompt="a red fox", negative_prompt="blurry", seed=11, steps=10, strength=0.75, scheduler="DPMSolverMultistep"),
    dict(prompt="a red fox", seed=12, steps=10, strength=0.8, refiner_start=0.4),
    dict(prompt="a red fox", seed=13, steps=10, strength=0.3, refiner_start=0.5),  # the refiner alone denoises
]
DEFAULTS = dict(negative_prompt="", guidance_scale=7.5, scheduler="EulerDiscrete", original_size=None,
                crops_coords_top_left=(0, 0), target_size=None, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                refiner_start=None, force_zeros_for_empty_prompt=True, max_prompt_chunks=1, strength=None)


def scheduler_config() -> dict:
    from python_coreml_sd import registry
    return dict(registry.family("tiny-xl")["scheduler"])


def tokenizers() -> tuple:
    """tiny-xl's tokenizers: the project's CLIP files, the second padding with "!" as SDXL's tokenizer_2."""
    from python_coreml_sd import registry
    from python_coreml_sd.random_models import load_clip_tokenizer
    pads = [registry.family("tiny-xl")["architecture"][name]["pad_token"] for name in ("tokenizer", "tokenizer_2")]
    return tuple(load_clip_tokenizer(pad) for pad in pads)


def bundle_config() -> str:
    """pipeline_config.json of a tiny-xl bundle with its refiner, as torch2coreml --bundle-packages writes it (the
    Swift tests read the second tokenizer's pad token, force_zeros_for_empty_prompt and time ids from it)."""
    from python_coreml_sd.bundle import pipeline_settings
    from python_coreml_sd.convert import ConversionOptions
    settings = pipeline_settings(ConversionOptions("tiny-xl", ".", refiner_version="tiny-xl-refiner"))
    return json.dumps(settings, indent=2, sort_keys=True) + "\n"


def start_image():
    """img2img's start image: closed_form.test_image's bytes, as the Swift tests make them (ClosedForm.testImage)."""
    from PIL import Image

    from python_coreml_sd.testing.closed_form import test_image_bytes
    return Image.fromarray(test_image_bytes(8 * LATENT_SIZE, 8 * LATENT_SIZE))


def floats(values) -> list:
    return [float(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def run_case(spec: dict) -> dict:
    from python_coreml_sd.generation.pipeline import GenerationRequest, StableDiffusionPipeline
    from python_coreml_sd.testing.closed_form import LATENT_SCALE, xl_model_set
    case = {**DEFAULTS, **spec}
    tokenizer, tokenizer_2 = tokenizers()
    models = xl_model_set(LATENT_SIZE, case["max_prompt_chunks"], refiner=case["refiner_start"] is not None)
    pipe = StableDiffusionPipeline(models, tokenizer, scheduler_config(), vae_scaling_factor=0.13025, progress=False,
                                   tokenizer_2=tokenizer_2,
                                   force_zeros_for_empty_prompt=case["force_zeros_for_empty_prompt"])
    request = GenerationRequest(
        prompt=case["prompt"], negative_prompt=case["negative_prompt"], seed=case["seed"],
        num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], scheduler=case["scheduler"],
        original_size=case["original_size"], crops_coords_top_left=case["crops_coords_top_left"],
        target_size=case["target_size"], aesthetic_score=case["aesthetic_score"],
        negative_aesthetic_score=case["negative_aesthetic_score"], refiner_start=case["refiner_start"],
        strength=case["strength"], image=None if case["strength"] is None else start_image())
    embeddings, added, _ = pipe.conditioning(request)
    out = {**{k: list(v) if isinstance(v, tuple) else v for k, v in case.items()},
           "scheduler": SCHEDULERS[case["scheduler"]], "vae_scaling_factor": 0.13025, "latent_size": LATENT_SIZE,
           "embeddings_shape": list(embeddings.shape), "embeddings": floats(embeddings),
           "time_ids": floats(added["time_ids"]), "text_embeds": floats(added["text_embeds"])}
    if case["refiner_start"] is not None:
        refiner_embeddings, refiner_added = pipe.refiner_conditioning(request)
        out.update(refiner_embeddings_shape=list(refiner_embeddings.shape), refiner_embeddings=floats(refiner_embeddings),
                   refiner_time_ids=floats(refiner_added["time_ids"]),
                   refiner_text_embeds=floats(refiner_added["text_embeds"]))
    result = pipe.generate(request)
    rgb = np.asarray(result.image)
    assert LATENT_SCALE != 0.13025  # the SDXL scale, not SD's, divides the latents before decoding
    out.update(latents=floats(result.intermediates["final_latents"]), rgb_crc32=zlib.crc32(rgb.tobytes()),
               rgb_head=[int(v) for v in rgb.reshape(-1)[:48]])
    return out


def build() -> dict:
    from python_coreml_sd.components import TIME_IDS
    from python_coreml_sd.testing import closed_form as cf
    return {"generator": "scripts/make_sdxl_vectors.py", "scheduler_config": scheduler_config(),
            "pipeline_config": bundle_config(),
            "widths": cf.XL_WIDTHS, "pooled": cf.XL_POOLED, "gains": cf.XL_GAINS,
            "time_ids": {k: list(v) for k, v in TIME_IDS.items()}, "cases": [run_case(spec) for spec in CASES]}


def dumps(golden: dict) -> str:
    return json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n"


if __name__ == "__main__":
    GOLDEN.write_text(dumps(build()), encoding="utf-8")
    print(f"wrote {GOLDEN}")
