"""The ControlNet and inpainting golden generations the Swift package tests against (scripts/make_control_vectors.py,
swift/Tests/StableDiffusionTests/Resources/control_golden.json) still match what the Python pipeline computes, and
the closed-form models make the ControlNets and the mask matter."""
import json

import numpy as np
import pytest

from tests import support
from tests.test_golden_vectors import STEP_ULPS, assert_within_ulps


@pytest.fixture(scope="module")
def script():
    return support.load_script("make_control_vectors")


@pytest.fixture(scope="module")
def committed(script):
    return json.loads(script.GOLDEN.read_text(encoding="utf-8"))


def test_committed_control_generations_match_python(script, committed):
    regenerated = json.loads(script.dumps(script.build()))
    outputs = ("latents", "rgb_crc32", "rgb_head")
    assert {k: v for k, v in committed.items() if k != "cases"} == {k: v for k, v in regenerated.items() if k != "cases"}
    for i, (case, new) in enumerate(zip(committed["cases"], regenerated["cases"], strict=True)):
        path = f"control_golden.json .cases[{i}]"
        assert {k: v for k, v in case.items() if k not in outputs} == {k: v for k, v in new.items() if k not in outputs}
        assert_within_ulps(new["latents"], case["latents"], STEP_ULPS * (case["steps"] + 1), f"{path}.latents")
        assert np.abs(np.asarray(new["rgb_head"]) - np.asarray(case["rgb_head"])).max() <= 1, path


def test_controlnets_and_mask_change_the_result(script):
    """The same request without its ControlNets' residuals (scale 0) or with a mask of nothing to repaint ends
    elsewhere: the golden cases exercise the residuals and the mask inputs."""
    base = script.run_case(script.CASES[1])
    silent = script.run_case({**script.CASES[1], "scales": [0.0, 0.0]})
    assert np.abs(np.subtract(base["latents"], silent["latents"])).max() > 0.1
    xl = next(spec for spec in script.CASES if spec.get("family") == "sdxl" and spec.get("gains"))
    xl_silent = script.run_case({**xl, "scales": [0.0] * len(xl["gains"])})
    assert np.abs(np.subtract(script.run_case(xl)["latents"], xl_silent["latents"])).max() > 0.1
    xl_inpaint = next(spec for spec in script.CASES if spec.get("family") == "sdxl" and spec.get("inpaint"))
    route = next(spec for spec in script.CASES if spec.get("masked"))  # the ControlNet inpaint route
    for spec in (script.CASES[3], xl_inpaint, route):
        inpaint = script.run_case(spec)
        script.MASK_FROM, saved = (64, 64), script.MASK_FROM
        try:
            unmasked = script.run_case(spec)
        finally:
            script.MASK_FROM = saved
        assert np.abs(np.subtract(inpaint["latents"], unmasked["latents"])).max() > 0.01
