"""The SDXL golden generations the Swift package tests against (scripts/make_sdxl_vectors.py,
swift/Tests/StableDiffusionTests/Resources/sdxl_golden.json) still match what the Python pipeline computes, and
the closed-form SDXL models exercise what they are there for (both pad tokens, force_zeros_for_empty_prompt,
the time ids, the refiner hand-off)."""
import json

import numpy as np
import pytest

from tests import support
from tests.test_golden_vectors import STEP_ULPS, assert_within_ulps

OUTPUTS = ("embeddings", "time_ids", "text_embeds", "refiner_embeddings", "refiner_time_ids", "refiner_text_embeds",
           "latents", "rgb_crc32", "rgb_head")


@pytest.fixture(scope="module")
def script():
    return support.load_script("make_sdxl_vectors")


@pytest.fixture(scope="module")
def committed(script):
    return json.loads(script.GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def regenerated(script):
    return json.loads(script.dumps(script.build()))


def test_committed_sdxl_generations_match_python(committed, regenerated):
    """Requests and shapes exactly; conditioning within a few ulps; final latents within STEP_ULPS per step;
    pixels within one level (a value on a rounding boundary may round either way)."""
    hint = "run `python scripts/make_sdxl_vectors.py` and check the Swift tests"
    assert {k: v for k, v in committed.items() if k != "cases"} == {k: v for k, v in regenerated.items() if k != "cases"}
    for i, (case, new) in enumerate(zip(committed["cases"], regenerated["cases"], strict=True)):
        path = f"sdxl_golden.json .cases[{i}]"
        assert {k: v for k, v in case.items() if k not in OUTPUTS} == {k: v for k, v in new.items() if k not in OUTPUTS}, \
            f"{path}: {hint}"
        for key in ("embeddings", "time_ids", "text_embeds", "refiner_embeddings", "refiner_time_ids",
                    "refiner_text_embeds"):
            assert (key in case) == (key in new), path
            if key in case:
                assert_within_ulps(new[key], case[key], 4, f"{path}.{key}")
        assert_within_ulps(new["latents"], case["latents"], STEP_ULPS * (case["steps"] + 1), f"{path}.latents")
        levels = np.abs(np.asarray(new["rgb_head"]) - np.asarray(case["rgb_head"]))
        assert levels.max() <= 1, f"{path}.rgb_head: {hint}"


def cases_by(committed, **where):
    return [c for c in committed["cases"] if all(c[k] == v for k, v in where.items())]


def test_golden_cases_cover_the_sdxl_conditioning(committed):
    """What the Swift tests rely on: empty negative prompts zeroed only with force_zeros_for_empty_prompt, the base's
    context both encoders wide and the refiner's the second's alone, 6 and 5 time ids, two prompt windows."""
    widths = committed["widths"]
    for case in committed["cases"]:
        batch, channels, _, length = case["embeddings_shape"]
        assert (batch, channels, length % 77) == (2, widths["text_encoder"] + widths["text_encoder_2"], 0)
        negative = np.asarray(case["embeddings"]).reshape(case["embeddings_shape"])[0]
        zeroed = case["force_zeros_for_empty_prompt"] and not case["negative_prompt"]
        assert (not negative.any()) == zeroed and (not any(case["text_embeds"][:committed["pooled"]])) == zeroed
        assert len(case["time_ids"]) == 2 * len(committed["time_ids"]["unet"])
        if case["refiner_start"] is not None:
            assert case["refiner_embeddings_shape"] == [2, widths["text_encoder_2"], 1, length]
            assert len(case["refiner_time_ids"]) == 2 * len(committed["time_ids"]["refiner"])
            assert np.asarray(case["refiner_embeddings"]).any()  # the refiner encodes the empty negative prompt
    assert cases_by(committed, max_prompt_chunks=2) and cases_by(committed, scheduler="dpmpp")
    assert {tuple(c["original_size"] or ()) for c in committed["cases"]} > {()}


def test_second_tokenizer_pads_with_its_own_token(script):
    """The two encoders see other ids for the same prompt: tokenizer_2 pads with "!" (id 0), the first with the end
    token; so a Swift pipeline padding both alike fails the golden embeddings."""
    first, second = script.tokenizers()
    ids = [t("a cat", padding="max_length", max_length=77).input_ids for t in (first, second)]
    assert ids[0][:4] == ids[1][:4] and ids[0][-1] == 49407 and ids[1][-1] == 0
