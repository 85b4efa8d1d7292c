"""Apple's own code on our packages and ours on Apple's (issue 14). On demand: `-m apple` with
APPLE_ML_STABLE_DIFFUSION set to a checkout or mirror of apple/ml-stable-diffusion (never committed)."""
import os
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.apple
ROOT = Path(__file__).resolve().parents[2]


def load_script():
    return support.load_script("apple_compat")


def sd2_like() -> str:
    from python_coreml_sd.random_models import materialized_model_dir
    return str(materialized_model_dir("tiny-sd2"))


@pytest.fixture(scope="module", params=["tiny", "sd2_like"])
def report(request, tmp_path_factory):
    repo = os.environ.get("APPLE_ML_STABLE_DIFFUSION")
    if not repo:
        pytest.skip("set APPLE_ML_STABLE_DIFFUSION to a checkout of apple/ml-stable-diffusion (docs/compat.md)")
    model = "tiny" if request.param == "tiny" else sd2_like()
    return load_script().run(Path(repo), tmp_path_factory.mktemp("apple_compat"), model)


def test_every_package_has_apples_interface(report):
    assert report["interfaces"] and all(difference is None for difference in report["interfaces"].values()), \
        report["interfaces"]


def test_each_pipeline_makes_the_same_image_from_either_converter(report):
    for which, value in report["psnr_db"].items():
        assert value >= 40, f"{which}: {value:.1f} dB"
