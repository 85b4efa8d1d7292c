import platform

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    on_macos = platform.system() == "Darwin"
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to PyTorch"))
        if "macos" in item.keywords and not on_macos:
            item.add_marker(pytest.mark.skip(reason="needs macOS: Core ML prediction and compilation exist only there"))


@pytest.fixture(scope="session")
def tiny_source():
    from python_coreml_sd.model_sources import resolve
    return resolve("tiny")


@pytest.fixture(scope="session")
def sd2_source():
    """An SD 2.x-like test model saved as a diffusers folder: 1024-d text encoder, linear projections."""
    from python_coreml_sd.model_sources import resolve
    from python_coreml_sd.random_models import materialized_model_dir
    return resolve(str(materialized_model_dir("tiny-sd2")))


def _convert_all(source, out_dir, components, **options):
    from python_coreml_sd.convert import ConversionOptions
    from python_coreml_sd.convert import convert
    opts = ConversionOptions(model_version=source.name, output_dir=out_dir, **options)
    return {path.name: path for path in convert(opts, components)}


TINY_COMPONENTS = ["text_encoder", "vae_decoder", "vae_encoder", "unet", "safety_checker"]


@pytest.fixture(scope="session")
def tiny_fp16_packages(tmp_path_factory, tiny_source):
    """Every component of `tiny`, fp16 (the default), converted once per session into one folder."""
    return _convert_all(tiny_source, tmp_path_factory.mktemp("tiny_fp16"), TINY_COMPONENTS)


@pytest.fixture(scope="session")
def tiny_models_dir(tiny_fp16_packages):
    return next(iter(tiny_fp16_packages.values())).parent


@pytest.fixture(scope="session")
def sd2_fp16_packages(tmp_path_factory, sd2_source):
    out = tmp_path_factory.mktemp("sd2_fp16")
    return _convert_all(sd2_source, out, ["text_encoder", "vae_decoder", "vae_encoder"])


@pytest.fixture(scope="session")
def picture():
    """A 128x128 RGB gradient to inpaint (the tiny families' 16x16 latents)."""
    import numpy as np
    from PIL import Image
    yy, xx = np.mgrid[0:128, 0:128]
    return Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy) % 256], axis=-1).astype(np.uint8))


@pytest.fixture(scope="session")
def mask():
    """Its inpainting mask: white (repaint) over a 64x60 box."""
    import numpy as np
    from PIL import Image
    pixels = np.zeros((128, 128, 3), np.uint8)
    pixels[32:96, 40:100] = 255
    return Image.fromarray(pixels)
