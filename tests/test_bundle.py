"""Bundles for apps (issue 7): Resources/ folders, reproducible zips, safe extraction, generation from a zip."""
import hashlib
import json
import os
import platform
import shutil
import stat
import zipfile

import numpy as np
import pytest
from PIL import Image

import python_coreml_sd.convert as conversion
from python_coreml_sd import bundle, pipeline as pipeline_cli, registry, torch2coreml
from python_coreml_sd.compression.palettize import palettize_mlpackage
from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.errors import UserError
from python_coreml_sd.generation.components import find_packages
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline

APPLE_NAMES = {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage",
               "SafetyChecker.mlpackage", "vocab.json", "merges.txt", "scheduler_config.json", "pipeline_config.json"}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(packages, out, **option_changes):
    """Resources/ and zip for `packages` (as written by a conversion) under `out`, as torch2coreml does."""
    options = ConversionOptions("tiny", out, **option_changes)
    out.mkdir(parents=True, exist_ok=True)
    resources = bundle.bundle_packages(options, packages, out / "Resources")
    fields = bundle.manifest_fields(options, "packages", resources)
    return resources, bundle.make_zip(resources, out / bundle.zip_name(options, "packages"), fields)


@pytest.fixture(scope="module")
def tiny_packages(tiny_fp16_packages):
    return sorted(tiny_fp16_packages.values())


@pytest.fixture(scope="module")
def built(tiny_packages, tmp_path_factory):
    return build(tiny_packages, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def palettized_packages(tiny_packages, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_6bit")
    for package in tiny_packages:  # what --quantize-nbits 6 writes: the large weights as 6-bit LUTs
        if package.name.endswith(("_unet.mlpackage", "_text_encoder.mlpackage")):
            palettize_mlpackage(package, out / package.name, 6)
        else:
            shutil.copytree(package, out / package.name)
    return sorted(out.iterdir())


@pytest.fixture(scope="module")
def built_palettized(palettized_packages, tmp_path_factory):
    return build(palettized_packages, tmp_path_factory.mktemp("bundle_6bit"), quantize_nbits=6)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHON_COREML_SD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------ layout and manifest

def test_packages_bundle_has_apples_names_and_the_tokenizer(built, tiny_packages):
    resources, _ = built
    assert {p.name for p in resources.iterdir()} == APPLE_NAMES
    unet_source = next(p for p in tiny_packages if p.name.endswith("_unet.mlpackage"))
    assert (resources / "Unet.mlpackage" / "Manifest.json").read_bytes() == (unet_source / "Manifest.json").read_bytes()
    for name in ("vocab.json", "merges.txt"):  # the CLIP files tiny was made from, byte for byte
        assert (resources / name).read_bytes() == (registry.TOKENIZER_DIR / name).read_bytes()
    assert set(find_packages(resources)) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker"}


def test_bundle_carries_the_models_scheduler_config(built):
    """What the Swift package reads instead of SD 1.x constants (SchedulerConfig.load)."""
    from python_coreml_sd.model_sources import resolve
    resources, archive = built
    written = json.loads((resources / "scheduler_config.json").read_text(encoding="utf-8"))
    assert written == resolve("tiny").config("scheduler")
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing", "steps_offset",
                "num_train_timesteps"):
        assert key in written, key
    with zipfile.ZipFile(archive) as z:
        assert any(name.endswith("scheduler_config.json") for name in z.namelist())
    source = resolve("tiny")
    settings = json.loads((resources / "pipeline_config.json").read_text(encoding="utf-8"))
    latent = source.config("unet")["sample_size"]
    assert settings == {"vae_scaling_factor": source.config("vae").get("scaling_factor", 0.18215),
                        "text_sequence_length": source.config("text_encoder")["max_position_embeddings"],
                        "latent_size": [latent, latent], "image_size": [8 * latent, 8 * latent]}


def test_pipeline_settings_follow_the_latent_size_flags():
    settings = bundle.pipeline_settings(ConversionOptions("tiny", "out", latent_h=12, latent_w=20))
    assert settings["latent_size"] == [12, 20] and settings["image_size"] == [96, 160]


@pytest.mark.parametrize("written, expected", [
    (["o/Stable_Diffusion_version_m_unet_chunk1.mlpackage", "o/Stable_Diffusion_version_m_unet_chunk2.mlpackage",
      "o/Stable_Diffusion_version_m_text_encoder.mlpackage"], ["TextEncoder", "UnetChunk1", "UnetChunk2"]),
    (["o/Stable_Diffusion_version_m_unet.mlpackage", "o/Stable_Diffusion_version_m_unet_chunk1.mlpackage",
      "o/Stable_Diffusion_version_m_unet_chunk2.mlpackage"], ["UnetChunk1", "UnetChunk2"]),
    (["o/Stable_Diffusion_version_m_control-unet_chunk1.mlpackage", "o/Stable_Diffusion_version_m_control-unet.mlpackage",
      "o/Stable_Diffusion_version_m_control-unet_chunk2.mlpackage", "o/ControlNet_lllyasviel_sd-controlnet-canny.mlpackage",
      "o/ControlNet_depth.mlpackage", "o/Stable_Diffusion_version_m_unet.mlpackage"],
     ["ControlledUnetChunk1", "ControlledUnetChunk2", "Unet", "controlnet/depth", "controlnet/lllyasviel_sd-controlnet-canny"]),
])
def test_chunked_unet_is_bundled_as_its_chunks(written, expected):
    assert sorted(bundle.resource_entries(written)) == expected


def test_zip_is_named_like_the_published_ones():
    options = ConversionOptions("stabilityai/stable-diffusion-2-1-base", ".",
                                attention_implementation="SPLIT_EINSUM_V2")
    assert bundle.zip_name(options, "compiled") == "coreml-stable-diffusion-2-1-base_split_einsum_v2_compiled.zip"
    options = ConversionOptions("runwayml/stable-diffusion-v1-5", ".", attention_implementation="ORIGINAL",
                                quantize_nbits=6)
    assert bundle.zip_name(options, "packages") == "coreml-stable-diffusion-v1-5-palettized_original_packages.zip"


def test_zip_layout_and_manifest(built):
    resources, archive = built
    assert archive.name == "coreml-tiny_split_einsum_packages.zip"
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        manifest = json.loads(zf.read("coreml-tiny_split_einsum_packages/manifest.json"))
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(n.startswith("coreml-tiny_split_einsum_packages/") for n in names)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert {i.external_attr >> 16 for i in infos} == {stat.S_IFREG | 0o644}
    assert manifest["format"] == bundle.FORMAT and manifest["kind"] == "packages"
    assert manifest["source_model"] == "tiny" and manifest["converter_version"] == torch2coreml.__version__
    assert manifest["components"] == ["SafetyChecker", "TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"]
    assert manifest["flags"]["attention_implementation"] == "SPLIT_EINSUM"
    assert manifest["flags"]["compute_precision"] == "float16" and "output_dir" not in manifest["flags"]
    on_disk = sorted(p.relative_to(resources).as_posix() for p in resources.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        assert entry == {"size": (resources / rel).stat().st_size, "sha256": sha256(resources / rel)}
    assert manifest["total_size"] == sum(e["size"] for e in manifest["files"].values())


def test_rebuild_gives_the_same_sha256(built, tiny_packages, tmp_path):
    _, first = built
    copies = tmp_path / "copies"
    for package in tiny_packages:  # other folder, other file times: the archive must not notice
        shutil.copytree(package, copies / package.name)
        for path in (copies / package.name).rglob("*"):
            os.utime(path, (1_700_000_000, 1_700_000_000))
    _, second = build(sorted(copies.iterdir()), tmp_path / "again")
    assert second.name == first.name and sha256(second) == sha256(first)


def test_palettized_variant(built_palettized, palettized_packages, built, tmp_path):
    resources, archive = built_palettized
    assert archive.name == "coreml-tiny-palettized_split_einsum_packages.zip"
    assert {p.name for p in resources.iterdir()} == APPLE_NAMES
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(f"{archive.stem}/manifest.json"))
    assert manifest["flags"]["quantize_nbits"] == 6
    plain = json.loads(zipfile.ZipFile(built[1]).read(f"{built[1].stem}/manifest.json"))
    weights = "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert manifest["files"][weights]["size"] < plain["files"][weights]["size"] / 2
    _, again = build(palettized_packages, tmp_path / "again", quantize_nbits=6)
    assert sha256(again) == sha256(archive)


# ------------------------------------------------------------------------------------ generation

def generate(models, steps=2):
    pipe = open_pipeline("mil", models, progress=False)
    return np.asarray(pipe.generate(GenerationRequest(prompt="a lighthouse", seed=4, num_inference_steps=steps)).image)


def test_generate_from_zip_and_resources_folder(built, cache, tmp_path):
    resources, archive = built
    argv = ["--prompt", "a lighthouse", "-i", str(archive), "-o", str(tmp_path / "png"), "--backend", "mil",
            "--num-inference-steps", "2", "--seed", "4"]
    assert pipeline_cli.main(argv) == 0
    with Image.open(tmp_path / "png" / "a_lighthouse.seed4.png") as image:
        from_cli = np.asarray(image.convert("RGB"))
    assert from_cli.shape == (128, 128, 3)
    extracted = list((cache / "bundles").iterdir())
    assert len(extracted) == 1 and {p.name for p in extracted[0].iterdir()} == APPLE_NAMES | {"manifest.json"}
    assert bundle.models_folder(archive) == extracted[0]  # a second run reuses the checked extraction
    assert list((cache / "bundles").iterdir()) == extracted
    assert np.array_equal(generate(resources), from_cli)


def test_generate_from_palettized_zip(built_palettized, cache):
    image = generate(built_palettized[1])
    assert image.shape == (128, 128, 3) and image.std() > 0


# ------------------------------------------------------------------------------------ extraction

def test_extract_bundle_round_trip(built, tmp_path):
    resources, archive = built
    dest = bundle.extract_bundle(archive, tmp_path / "x" / "Resources")
    for path in resources.rglob("*"):
        if path.is_file():
            assert (dest / path.relative_to(resources)).read_bytes() == path.read_bytes()
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["Resources"]  # no temporary folder left
    with pytest.raises(UserError, match="exists"):
        bundle.extract_bundle(archive, dest)


def crafted_zip(path, files: dict, manifest_files: dict = None, symlinks: dict = None):
    """A zip whose manifest lists `manifest_files` (default: `files`, honestly) under folder 'b/'."""
    def entry(data):
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    listed = {name: entry(data) for name, data in (files if manifest_files is None else manifest_files).items()}
    manifest = {"format": bundle.FORMAT, "files": listed}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("b/manifest.json", json.dumps(manifest))
        for name, data in files.items():
            zf.writestr(name if name.startswith(("/", "..", "C:")) or "\\" in name else f"b/{name}", data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(f"b/{name}")
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case, message", [
    ("dotdot", "'..'"), ("absolute", "an absolute path"), ("drive", "a drive letter"), ("backslash", "backslash"),
    ("symlink", "a symbolic link"), ("tampered", "vocab.json fails its sha256 check"),
    ("resized", "vocab.json is 6 bytes but manifest.json says 5"), ("unlisted", "extra.bin is not listed"),
    ("missing", "merges.txt is listed in manifest.json but missing"), ("no_manifest", "no manifest.json"),
])
def test_extractor_refuses_crafted_zips(tmp_path, case, message):
    work = tmp_path / "work"
    work.mkdir()
    good = {"vocab.json": b"{}\n\n\n", "merges.txt": b"#v\n"}
    outside = tmp_path / "evil.txt"
    zip_path = work / "bad.zip"
    if case == "dotdot":
        crafted_zip(zip_path, {**good, "../../evil.txt": b"x"})
    elif case == "absolute":
        crafted_zip(zip_path, {**good, str(outside): b"x"})
    elif case == "drive":
        crafted_zip(zip_path, {**good, "C:/evil.txt": b"x"})
    elif case == "backslash":
        crafted_zip(zip_path, {**good, "..\\..\\evil.txt": b"x"})
    elif case == "symlink":
        crafted_zip(zip_path, good, symlinks={"Unet.mlpackage": str(tmp_path)})
    elif case == "tampered":
        crafted_zip(zip_path, {**good, "vocab.json": b"{}\n\n\t"}, manifest_files=good)
    elif case == "resized":
        crafted_zip(zip_path, {**good, "vocab.json": b"{}\n\n\n\n"}, manifest_files={**good, "vocab.json": b"{}\n\n\n"})
    elif case == "unlisted":
        crafted_zip(zip_path, {**good, "extra.bin": b"x"}, manifest_files=good)
    elif case == "missing":
        crafted_zip(zip_path, {"vocab.json": good["vocab.json"]}, manifest_files=good)
    else:
        with zipfile.ZipFile(zip_path, "w") as zf:
            zf.writestr("b/vocab.json", b"{}")
    before = listing(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        bundle.extract_bundle(zip_path, work / "dest")
    assert "bad.zip" in str(info.value) and "\n" not in str(info.value)
    assert listing(tmp_path) == before and not outside.exists()


def test_tampered_package_file_in_a_real_bundle(built, tmp_path, cache, capsys):
    _, archive = built
    tampered = tmp_path / archive.name
    target = f"{archive.stem}/Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == target:
                data = data[:-1] + bytes([data[-1] ^ 1])  # one bit, same size
            dst.writestr(info, data)
    with pytest.raises(SystemExit) as exit_info:
        pipeline_cli.main(["--prompt", "a fox", "-i", str(tampered), "-o", str(tmp_path / "png"), "--backend", "mil",
                           "--num-inference-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin fails its sha256 check" in err
    assert not (cache / "bundles").exists() or not list((cache / "bundles").iterdir())
    assert not (tmp_path / "png").exists() or not list((tmp_path / "png").iterdir())


# ------------------------------------------------------------------------------- converter wiring

def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.skipif(platform.system() == "Darwin", reason="the fail-fast path is for machines without Xcode")
def test_compiled_bundle_fails_fast_off_macos(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(conversion, "converter", lambda component: pytest.fail("conversion started"))
    code, err = run_main(capsys, "--convert-text-encoder", "--convert-unet", "--bundle-resources-for-swift-cli",
                         "--zip", "-o", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 0 and err.startswith("torch2coreml: error:")
    assert "only on macOS" in err and "--bundle-packages" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--zip"], "--zip archives a bundle: add --bundle-packages"),
    (["--bundle-packages", "--bundle-resources-for-swift-cli"], "not allowed with argument"),
])
def test_bundle_flag_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(conversion, "converter", lambda component: pytest.fail("conversion started"))
    code, err = run_main(capsys, "--convert-text-encoder", "-o", str(tmp_path / "out"), *argv)
    assert code == 2 and message in err and err.count("\n") == 0


def test_cli_bundles_after_converting_and_refuses_to_clobber(capsys, tmp_path, tiny_models_dir, built, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(tiny_models_dir, out)  # every package exists: the converter skips them, as on a re-run
    argv = ["--convert-text-encoder", "--convert-vae-decoder", "--convert-vae-encoder", "--convert-unet",
            "--convert-safety-checker", "--bundle-packages", "--zip", "-o", str(out)]
    assert torch2coreml.main(argv) == 0
    archive = out / "coreml-tiny_split_einsum_packages.zip"
    assert f"sha256 {sha256(archive)}" in capsys.readouterr().err
    assert {p.name for p in (out / "Resources").iterdir()} == APPLE_NAMES
    assert sha256(archive) == sha256(built[1])
    monkeypatch.setattr(conversion, "converter", lambda component: pytest.fail("conversion started"))
    code, err = run_main(capsys, *argv)
    assert code == 2 and f"{archive.name} exists; pass --overwrite" in err
    monkeypatch.undo()  # the converters run again from here, and keep the existing packages
    archive.unlink()  # interrupted after Resources/ was written: the rerun resumes with the zip
    assert torch2coreml.main(argv) == 0
    assert sha256(archive) == sha256(built[1])
    (out / "Resources" / "vocab.json").unlink()  # a Resources/ that no longer holds these files
    archive.unlink()
    code, err = run_main(capsys, *argv)
    assert code == 2 and "Resources exists and does not hold these packages" in err
    assert not archive.exists()


@pytest.mark.macos
def test_compiled_bundle_on_macos(tiny_packages, tmp_path):
    options = ConversionOptions("tiny", tmp_path)
    resources = bundle.bundle_compiled(options, tiny_packages, tmp_path / "Resources")
    assert {p.name for p in resources.iterdir()} == {n.replace(".mlpackage", ".mlmodelc") for n in APPLE_NAMES}
    assert all((resources / f"{n}.mlmodelc" / "coremldata.bin").is_file() for n in ("TextEncoder", "Unet"))
    fields = bundle.manifest_fields(options, "compiled", resources)
    archive = bundle.make_zip(resources, tmp_path / bundle.zip_name(options, "compiled"), fields)
    assert archive.name == "coreml-tiny_split_einsum_compiled.zip"
    assert fields["components"] == ["SafetyChecker", "TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"]
