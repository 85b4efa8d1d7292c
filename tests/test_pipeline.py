"""Generation on the mil and torch backends for `tiny`, and the CLI's handling of bad input."""
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from python_coreml_sd import pipeline as pipeline_cli
from python_coreml_sd.errors import UserError
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.schedulers import SCHEDULERS
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.metrics import psnr

STEPS = 4


@pytest.fixture(scope="module")
def pipes(tiny_models_dir):
    return {backend: open_pipeline(backend, tiny_models_dir, progress=False) for backend in ("mil", "torch")}


@pytest.fixture(scope="module")
def start_image():
    gradient = np.linspace(0, 255, 128, dtype=np.float32)
    rgb = np.stack([np.add.outer(gradient, gradient) / 2, np.tile(gradient, (128, 1)), 255 - np.add.outer(
        gradient, 0 * gradient)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def image_psnr(a, b):
    return psnr(np.asarray(a.image, np.float32), np.asarray(b.image, np.float32))


# Every scheduler, text-to-image with a negative prompt and img2img without one.
CASES = [(name, mode) for name in SCHEDULERS for mode in ("txt2img", "img2img")]


@pytest.mark.parametrize("scheduler, mode", CASES)
def test_mil_matches_torch(pipes, start_image, scheduler, mode):
    request = GenerationRequest(prompt="a lighthouse at dusk, oil painting", seed=7, num_inference_steps=STEPS,
                                scheduler=scheduler,
                                negative_prompt="blurry" if mode == "txt2img" else "",
                                image=start_image if mode == "img2img" else None, strength=0.6)
    mil, reference = pipes["mil"].generate(request), pipes["torch"].generate(request)
    assert mil.image.size == reference.image.size == (128, 128)
    assert image_psnr(reference, mil) >= 30
    assert psnr(reference.intermediates["final_latents"], mil.intermediates["final_latents"]) >= 30


def test_negative_prompt_and_img2img_change_the_result(pipes, start_image):
    base = GenerationRequest(prompt="a red fox", seed=3, num_inference_steps=STEPS)
    plain = pipes["torch"].generate(base).intermediates["final_latents"]
    negative = pipes["torch"].generate(GenerationRequest(prompt="a red fox", seed=3, num_inference_steps=STEPS,
                                                         negative_prompt="snow")).intermediates["final_latents"]
    img2img = pipes["torch"].generate(GenerationRequest(prompt="a red fox", seed=3, num_inference_steps=STEPS,
                                                        image=start_image)).intermediates["final_latents"]
    assert not np.allclose(plain, negative) and not np.allclose(plain, img2img)


def test_same_seed_same_image_other_seed_other_image(pipes):
    request = GenerationRequest(prompt="a red fox", seed=11, num_inference_steps=STEPS, scheduler="EulerAncestralDiscrete")
    first, second = pipes["mil"].generate(request), pipes["mil"].generate(request)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    request.seed = 12
    assert not np.array_equal(np.asarray(first.image), np.asarray(pipes["mil"].generate(request).image))


def test_long_prompt_is_truncated_with_a_warning(pipes):
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        pipes["mil"].tokenize("word " * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipes["mil"].tokenize("short").shape == (1, 77)


@pytest.mark.parametrize("change, message", [
    (dict(prompt="  "), "prompt is empty"),
    (dict(num_inference_steps=0), "must be at least 1"),
    (dict(strength=0.0), r"--strength must be in \(0, 1\]"),
    (dict(strength=1.5), r"--strength must be in \(0, 1\]"),
])
def test_bad_requests(pipes, start_image, change, message):
    request = GenerationRequest(prompt="a red fox", image=start_image)
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(UserError, match=message):
        pipes["mil"].generate(request)


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        pipeline_cli.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_cli_writes_png_with_metadata_and_refuses_to_clobber(capsys, tmp_path, tiny_models_dir):
    argv = ["--prompt", "A red fox!", "-i", str(tiny_models_dir), "-o", str(tmp_path), "--num-inference-steps", "2",
            "--backend", "mil", "--seed", "5"]
    assert pipeline_cli.main(argv) == 0
    png = tmp_path / "a_red_fox.seed5.png"
    with Image.open(png) as image:
        assert image.size == (128, 128)
        assert image.text["prompt"] == "A red fox!" and image.text["seed"] == "5"
        assert image.text["scheduler"] == "PNDM" and image.text["backend"] == "mil"
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "exists; pass --overwrite" in err
    assert pipeline_cli.main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [png.name]


def test_cli_bad_inputs(capsys, tmp_path, tiny_models_dir):
    base = ["--prompt", "a fox", "-o", str(tmp_path / "o"), "--backend", "mil"]
    cases = [
        (["-i", str(tmp_path / "missing")], "does not exist"),
        (["-i", str(tiny_models_dir), "--num-inference-steps", "0"], "must be at least 1"),
        (["-i", str(tiny_models_dir), "--image", str(tmp_path / "nope.png")], "cannot read --image"),
        (["-i", str(tiny_models_dir), "--prompt", ""], "prompt is empty"),
        (["-i", str(tiny_models_dir), "--backend", "coreml"] if not _on_macos() else None, "needs macOS"),
        (["-i", str(tiny_models_dir), "--scheduler", "Magic"], "invalid choice: 'Magic'"),
    ]
    for extra, message in cases:
        if extra is None:
            continue
        code, err = run_cli(capsys, *(base + extra))
        assert code == 2, (extra, err)
        assert message in err and err.count("\n") == 0, err
        assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_generate_images_library_api(tmp_path, tiny_models_dir):
    from python_coreml_sd.generation.jobs import ImageJob, Models, generate_images, requests_for
    job = ImageJob(Models("mil", tiny_models_dir), requests_for(["a fox"], [1, 2], num_inference_steps=2), tmp_path)
    written = generate_images(job, lambda request: {"seed": request.seed})
    assert [p.name for p in written] == ["a_fox.seed1.png", "a_fox.seed2.png"]
    with Image.open(written[0]) as first, Image.open(written[1]) as second:
        assert first.text["seed"] == "1" and np.abs(np.asarray(first, float) - np.asarray(second, float)).max() > 0
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        generate_images(job)


def test_cli_refuses_bad_numbers_paths_and_images_before_any_work(capsys, tmp_path, tiny_models_dir):
    """One line, exit 2, and no output folder or PNG: seeds outside NumPy's range (also the last one of
    --num-images), non-finite guidance, an -o that is a file or lies under one, a bomb-sized --image."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    small_png = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(small_png)
    out = tmp_path / "o"
    base = ["--prompt", "a fox", "-i", str(tiny_models_dir), "--backend", "mil", "--num-inference-steps", "2"]
    cases = [
        (["--seed", "-1"], "--seed -1 is outside 0..4294967295"),
        (["--seed", "4294967296"], "--seed 4294967296 is outside"),
        (["--seed", str(2**64)], "is outside 0..4294967295"),
        (["--seed", "4294967295", "--num-images", "2"], "--seed 4294967296 is outside"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
        (["--strength", "nan", "--image", str(small_png)], "--strength must be in"),
        (["--image", str(png_header_only(tmp_path / "large.png", 9000, 9000))], "is 9000x9000"),
        (["--image", str(png_header_only(tmp_path / "bomb.png", 20000, 20000))], "decompression bomb"),
    ]
    for extra, message in cases:
        code, err = run_cli(capsys, *base, "-o", str(out), *extra)
        assert code == 2 and message in err and err.count("\n") == 0, (extra, err)
        assert not out.exists(), extra
    for target, message in ((a_file, "a_file is a file"), (a_file / "sub", "a_file is a file")):
        code, err = run_cli(capsys, *base, "-o", str(target))
        assert code == 2 and message in err and err.count("\n") == 0, err
    assert a_file.read_text() == ""


def test_incomplete_model_folder(capsys, tmp_path, tiny_models_dir):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_models_dir, partial)
    shutil.rmtree(next(partial.glob("*_unet.mlpackage")))
    code, err = run_cli(capsys, "--prompt", "a fox", "-i", str(partial), "-o", str(tmp_path / "o"), "--backend", "mil")
    assert code == 2 and "has no unet package" in err


def test_component_converted_at_another_latent_size(capsys, tmp_path, tiny_models_dir):
    from python_coreml_sd.convert import ConversionOptions
    from python_coreml_sd.convert import convert
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_models_dir, mixed)
    convert(ConversionOptions("tiny", mixed, latent_h=8, latent_w=8, overwrite=True), ["vae_decoder"])
    code, err = run_cli(capsys, "--prompt", "a fox", "-i", str(mixed), "-o", str(tmp_path / "o"), "--backend", "mil")
    assert code == 2 and "VAE decoder was converted for 8x8 latents but the UNet for 16x16" in err


def _on_macos():
    import platform
    return platform.system() == "Darwin"


def test_a_folder_with_vocab_and_merges_brings_its_tokenizer(tmp_path, tiny_models_dir):
    """Apple's and Hugging Face's Resources folders carry the tokenizer the text encoder was made with."""
    import json

    from python_coreml_sd import registry
    folder = tmp_path / "Resources"
    shutil.copytree(tiny_models_dir, folder)
    vocab = json.loads((registry.TOKENIZER_DIR / "vocab.json").read_text())
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]  # a tokenizer unlike the model's own
    (folder / "vocab.json").write_text(json.dumps(vocab))
    shutil.copy(registry.TOKENIZER_DIR / "merges.txt", folder / "merges.txt")
    ids = lambda pipe: pipe.tokenizer("a cat").input_ids
    bundled, own = open_pipeline("mil", folder, progress=False), open_pipeline("mil", tiny_models_dir, progress=False)
    assert ids(bundled)[2] == vocab["cat</w>"] != ids(own)[2]
    (folder / "merges.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not a CLIP tokenizer"):
        open_pipeline("mil", folder, progress=False)


def test_torch_compile_runs_the_unet_compiled_with_the_same_image(pipes, tiny_models_dir):
    """--torch-compile: the mil backend's UNet runs through torch.compile, the other components op by op,
    and the picture is the uncompiled one (fused fp32 kernels aside)."""
    compiled = open_pipeline("mil", tiny_models_dir, progress=False, torch_compile=True)
    assert compiled.models["unet"].model._torch_compile
    assert pipes["mil"].models["unet"].model._fuse and not pipes["mil"].models["vae_decoder"].model._fuse
    assert not compiled.models["vae_decoder"].model._torch_compile
    request = GenerationRequest(prompt="a lighthouse at dusk", seed=7, num_inference_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to op by op would warn
        result = compiled.generate(request)
    assert compiled.models["unet"].model._torch_compile  # still compiled: it did not fall back
    assert image_psnr(pipes["mil"].generate(request), result) >= 40


def test_torch_compile_needs_the_mil_backend(tmp_path, capsys):
    code, err = run_cli(capsys, "--prompt", "x", "--backend", "torch", "--torch-compile", "-o", str(tmp_path / "out"))
    assert code == 2
    assert len(err.splitlines()) == 1 and "--torch-compile" in err and "--backend mil" in err
    assert not (tmp_path / "out").exists()
