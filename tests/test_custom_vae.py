"""--custom-vae-version: another model's VAE, or a VAE file in the original layout, replaces the model's."""
import pytest
import torch

from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.errors import UserError
from tests import ldm_layout


@pytest.fixture(scope="module")
def other_source():
    from python_coreml_sd.model_sources import resolve
    from python_coreml_sd.random_models import materialized_model_dir
    return resolve(str(materialized_model_dir("tiny", seed=1)))


def _vae_of(**options):
    from python_coreml_sd.model_edits import source_for
    return source_for(ConversionOptions("tiny", "unused", **options)).load_vae().state_dict()


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_vae_of_another_model_folder(other_source, tiny_source):
    vae = _vae_of(custom_vae_version=str(other_source.root))
    assert _same(vae, other_source.load_vae().state_dict())
    assert not _same(vae, tiny_source.load_vae().state_dict())


@pytest.mark.parametrize("prefixed", [True, False])
def test_vae_file_in_the_original_layout(tmp_path, other_source, prefixed):
    from safetensors.torch import save_file
    vae = other_source.load_vae()
    state = ldm_layout.vae_to_ldm(vae.state_dict(), dict(vae.config))
    if not prefixed:
        state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert _same(_vae_of(custom_vae_version=str(path)), vae.state_dict())


def test_vae_file_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "odd.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    with pytest.raises(UserError, match="not a VAE of this model's architecture"):
        _vae_of(custom_vae_version=str(path))
