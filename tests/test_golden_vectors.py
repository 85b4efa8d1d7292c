"""The golden vectors the Swift package tests against still match what the Python side computes.

scripts/make_golden_vectors.py writes swift/Tests/StableDiffusionTests/Resources/golden.json; the
Swift tests compare the tokenizer, random sources, schedulers and the closed-form generation loop
with it. Regenerating here catches drift on the Python side (a diffusers, transformers, torch or
closed_form.py change) before it shows up as a Swift failure on a Mac.
"""
import importlib.util
import json
import platform
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "golden.json"


def load_script():
    spec = importlib.util.spec_from_file_location("make_golden_vectors", ROOT / "scripts" / "make_golden_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def committed():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def regenerated(script):
    return json.loads(script.dumps(script.build()))


def assert_close(actual, expected, path="", rtol=1e-6):
    """Exact for ids, timesteps, flags and checksums; float lists within rtol of their largest value,
    since another CPU's torch kernels may round scheduler arithmetic differently."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}", rtol)
    elif isinstance(expected, list) and expected and all(isinstance(v, float) for v in expected):
        a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
        assert a.shape == e.shape, path
        assert np.abs(a - e).max() <= rtol * max(np.abs(e).max(), 1e-30), path
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{path}[{i}]", rtol)
    else:
        assert actual == expected, path


DRIFT_HINT = "run `python scripts/make_golden_vectors.py` and check the Swift tests"


@pytest.mark.parametrize("section", ["tokenizer", "random"])
def test_committed_ids_and_samples_match_python_exactly(committed, regenerated, section):
    expected = dict(committed[section])
    actual = dict(regenerated[section])
    if section == "random" and platform.machine().lower() not in ("x86_64", "amd64"):
        # Arm torch builds use the scalar kernel for >= 16 samples: compare those with torch_scalar.
        expected.pop("torch"), actual.pop("torch")
    assert actual == expected, f"golden.json's {section!r} section drifted from the Python side; {DRIFT_HINT}"


@pytest.mark.parametrize("section", ["schedulers", "loop"])
def test_committed_schedulers_and_loop_match_python(committed, regenerated, section):
    try:
        assert_close(regenerated[section], committed[section])
    except AssertionError as error:
        raise AssertionError(f"golden.json's {section!r} section drifted at {error}; {DRIFT_HINT}") from None


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


def test_numpy_is_the_pipeline_random_source():
    from python_coreml_sd.testing.closed_form import random_normal
    expected = np.random.RandomState(3).randn(1, 4, 8, 8).astype(np.float32)
    np.testing.assert_array_equal(random_normal("numpy", 3, (1, 4, 8, 8)), expected)


def test_random_crc_covers_every_value(committed):
    from python_coreml_sd.testing.closed_form import random_normal
    case = next(c for c in committed["random"]["numpy"] if c["count"] == 16384)
    values = random_normal("numpy", case["seed"], case["shape"])
    assert zlib.crc32(values.astype("<f4").tobytes()) == case["crc32"]


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
