"""The golden vectors the Swift package tests against still match what the Python side computes.

scripts/make_golden_vectors.py writes swift/Tests/StableDiffusionTests/Resources/golden.json; the
Swift tests compare the tokenizer, random sources, schedulers and the closed-form generation loop
with it. Regenerating here catches drift on the Python side (a diffusers, transformers, torch or
closed_form.py change) before it shows up as a Swift failure on a Mac.
"""
import json
import platform
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests import support

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "golden.json"


def load_script():
    return support.load_script("make_golden_vectors")


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def committed():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def regenerated(script):
    return json.loads(script.dumps(script.build()))


# Tolerances for float32 arithmetic that another CPU may round differently (other SIMD kernels, FMA,
# libm): values are compared relative to the largest magnitude of their list, in float32 ulps of it.
# One scheduler step is about ten float32 roundings of operands no larger than that magnitude, each
# off by at most half an ulp, so one step can differ by about 5 ulps; measured with torch's portable
# kernels (ATEN_CPU_CAPABILITY=default) against the committed AVX2 values: at most 2.5. Over a chain of
# N steps whose sample coefficients are at most about 1, the differences add up: N times that bound.
ULP = float(np.finfo(np.float32).eps)
STEP_ULPS = 8


def assert_within_ulps(actual, expected, ulps: float, path: str) -> None:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, path
    scale = max(float(np.abs(e).max(initial=0.0)), 1e-30)
    error = float(np.abs(a - e).max(initial=0.0))
    assert error <= ulps * ULP * scale, f"{path}: {error:.3g} > {ulps} ulps of {scale:.3g}"


def drifted(section: str, error: AssertionError) -> str:
    return f"golden.json's {section!r} section drifted at {error}; {DRIFT_HINT}"


DRIFT_HINT = "run `python scripts/make_golden_vectors.py` and check the Swift tests"


@pytest.mark.parametrize("section", ["tokenizer", "random"])
def test_committed_ids_and_samples_match_python_exactly(committed, regenerated, section):
    expected = dict(committed[section])
    actual = dict(regenerated[section])
    if section == "random" and platform.machine().lower() not in ("x86_64", "amd64"):
        # Arm torch builds use the scalar kernel for >= 16 samples: compare those with torch_scalar.
        expected.pop("torch"), actual.pop("torch")
    assert actual == expected, f"golden.json's {section!r} section drifted from the Python side; {DRIFT_HINT}"


def test_committed_schedulers_match_diffusers_step_by_step(script, committed, regenerated):
    """Timesteps and model outputs exactly; each committed step within STEP_ULPS of diffusers' step
    from the committed sample before it (the chain itself is not recomputed: see replay_scheduler_case)."""
    section, fresh = committed["schedulers"], regenerated["schedulers"]
    try:
        assert_within_ulps(fresh["alphas_cumprod"], section["alphas_cumprod"], STEP_ULPS, "alphas_cumprod")
        for i, (case, new) in enumerate(zip(section["cases"], fresh["cases"], strict=True)):
            path = f".cases[{i}]"
            assert (case["scheduler"], case["prediction_type"], case["steps"]) == (
                new["scheduler"], new["prediction_type"], new["steps"]), path
            assert case["timesteps"] == new["timesteps"], f"{path}.timesteps"
            assert case["model_outputs"] == new["model_outputs"], f"{path}.model_outputs"
            if "sigmas" in case:
                assert_within_ulps(new["sigmas"], case["sigmas"], STEP_ULPS, f"{path}.sigmas")
            for k, step in enumerate(script.replay_scheduler_case(case)):
                assert_within_ulps(step, case["samples"][k + 1], STEP_ULPS, f"{path}.samples[{k + 1}]")
    except AssertionError as error:
        raise AssertionError(drifted("schedulers", error)) from None


def test_committed_loop_matches_python(committed, regenerated):
    """Final latents within STEP_ULPS per step (+1 for the first draw) of a fresh run; the pixels are a
    function of the latents, checked exactly on the committed latents and within one level of the
    fresh ones (a value on a rounding boundary may round either way)."""
    from python_coreml_sd.testing import closed_form as cf
    try:
        for i, (case, new) in enumerate(zip(committed["loop"]["cases"], regenerated["loop"]["cases"], strict=True)):
            path = f".cases[{i}]"
            assert {k: v for k, v in case.items() if k not in ("latents", "rgb_crc32", "rgb_head")} == {
                k: v for k, v in new.items() if k not in ("latents", "rgb_crc32", "rgb_head")}, path
            assert_within_ulps(new["latents"], case["latents"], STEP_ULPS * (len(case["timesteps"]) + 1),
                               f"{path}.latents")
            latents = np.asarray(case["latents"], dtype=np.float32).reshape(4, case["latent_size"], -1)
            image = cf.decode(latents / np.float32(cf.LATENT_SCALE))
            rgb = cf.to_rgb8(np.zeros_like(image) - 1 if case["unsafe"] else image)
            assert zlib.crc32(rgb.tobytes()) == case["rgb_crc32"], f"{path}.rgb_crc32"
            levels = np.abs(np.asarray(new["rgb_head"], dtype=int) - np.asarray(case["rgb_head"], dtype=int))
            assert levels.max() <= 1, f"{path}.rgb_head"
    except AssertionError as error:
        raise AssertionError(drifted("loop", error)) from None


def test_golden_file_is_small_and_varied(committed):
    assert GOLDEN.stat().st_size < 2_000_000
    prompts = [case["prompt"] for case in committed["tokenizer"]["cases"]]
    assert len(prompts) >= 400
    assert "" in prompts and any(len(p) > 300 for p in prompts)
    assert any(ord(ch) > 0x3000 for p in prompts for ch in p)  # CJK
    truncated = [case for case in committed["tokenizer"]["cases"] if len(case["ids"]) == 77]
    assert truncated and all(case["ids"][-1] == 49407 for case in truncated)
    sizes = {case["count"] for case in committed["random"]["torch"]}
    assert {1, 15, 16, 17, 16384} <= sizes  # both torch code paths and the 16-block remainder


@pytest.mark.parametrize("count", [1, 17, 256, 16384])
def test_pipeline_random_source_draws_the_committed_numpy_stream(committed, count):
    """generation.random_source.RandomSource (what every backend draws from) gives the committed
    stream that the Swift source matches: every value of the first draw, by CRC32 of its bytes."""
    from python_coreml_sd.generation.random_source import RandomSource
    cases = [c for c in committed["random"]["numpy"] if c["count"] == count]
    assert cases
    for case in cases:
        values = RandomSource(case["seed"]).normal(case["shape"])
        assert values.dtype == np.float32 and list(values.shape) == case["shape"]
        assert zlib.crc32(values.astype("<f4").tobytes()) == case["crc32"], case["seed"]
        if "values" in case:
            assert values.reshape(-1).tolist() == case["values"]


def test_pipeline_random_source_continues_one_stream():
    """Successive draws continue one stream (img2img draws diagonal_noise, then noise)."""
    from python_coreml_sd.generation.random_source import RandomSource
    source = RandomSource(7)
    first, second = source.normal((2, 3)), source.normal((4,))
    both = np.random.RandomState(7).randn(10).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate([first.reshape(-1), second]), both)


def test_closed_form_loop_guidance_and_scaling():
    """The Python loop itself: guidance changes the result, img2img starts late, decode sees z / 0.18215."""
    from python_coreml_sd.testing import closed_form as cf
    tokenize = load_script().make_tokenizer()
    base = cf.run_loop(cf.LoopConfig("a cat", steps=5, seed=1), tokenize)
    unguided = cf.run_loop(cf.LoopConfig("a cat", steps=5, seed=1, guidance_scale=1.0), tokenize)
    assert not np.array_equal(base.latents, unguided.latents)
    img2img = cf.run_loop(cf.LoopConfig("a cat", steps=10, seed=1, strength=0.3), tokenize)
    assert img2img.timesteps == [301, 201, 101, 1]  # PNDM lists 11 timesteps for 10 steps; skip 7
    decoded = cf.decode(base.latents / np.float32(cf.LATENT_SCALE))
    assert np.array_equal(cf.to_rgb8(decoded), base.rgb)


def test_swift_png_writer_output_decodes_with_pillow():
    """swift/.../gradient_33x17.png is written by the Swift PNGWriter (PNGTests checks it still is)."""
    from PIL import Image
    with Image.open(GOLDEN.parent / "gradient_33x17.png") as image:
        image.load()
        assert image.mode == "RGB" and image.size == (33, 17)
        pixels = np.asarray(image)
    y, x = np.meshgrid(np.arange(17), np.arange(33), indexing="ij")
    expected = np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp"])
@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("unet_batch", [2, 1])
def test_real_pipeline_with_closed_form_models_matches_the_golden_loop(scheduler, strength, unet_batch):
    """python_coreml_sd.generation's pipeline, run on the closed-form models, gives bit for bit the
    latents and pixels of closed_form.run_loop, which the Swift loop matches: so Swift follows the
    real pipeline (guidance order, draw order, img2img start, scaling), not just a copy of it."""
    from PIL import Image
    from python_coreml_sd.generation.pipeline import GenerationRequest, StableDiffusionPipeline
    from python_coreml_sd.testing import closed_form as cf
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(str(ROOT / "models/tokenizer/vocab.json"), str(ROOT / "models/tokenizer/merges.txt"))
    names = {"pndm": "PNDM", "dpmpp": "DPMSolverMultistep"}
    pipeline = StableDiffusionPipeline(cf.model_set(8, unet_batch), tokenizer, cf.SD_SCHEDULER_CONFIG, progress=False)
    image = Image.fromarray(cf.test_image_bytes(64, 64)) if strength else None
    request = GenerationRequest(prompt="a cat", negative_prompt="blurry", seed=4, num_inference_steps=6,
                                scheduler=names[scheduler], image=image, strength=strength or 0.75)
    result = pipeline.generate(request)
    reference = cf.run_loop(cf.LoopConfig("a cat", negative_prompt="blurry", seed=4, steps=6, scheduler=scheduler,
                                          strength=strength), load_script().make_tokenizer())
    np.testing.assert_array_equal(result.intermediates["final_latents"][0], reference.latents)
    np.testing.assert_array_equal(np.asarray(result.image), reference.rgb)
