"""Packages and bundles as untrusted input (issue 15): nothing outside a package is loaded, zips and
load-time allocations are bounded.

Every refusal is one line and exit 2 from the CLIs (a UserError from the library), before anything
is written under a final name."""
import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests import support

from python_coreml_sd import bundle
from python_coreml_sd.errors import UserError
from python_coreml_sd.runtime import load_model
from python_coreml_sd.runtime.mil import bounds

SAFE = "not a self-contained Core ML package"


def small_program(tmp_path, name="small.mlpackage", fill_shape=None):
    """y = x + 1 (x fp32 (2,)); with fill_shape (ending in 2), y = x + fill(fill_shape, 1.0) instead."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Placeholder, Program, types

    with Function({"x": Placeholder((2,), dtype=types.fp32)}, opset_version=ct.target.iOS16) as func:
        x = func.inputs["x"]
        if fill_shape is None:
            y = mb.add(x=x, y=np.float32(1), name="y")
        else:
            big = mb.fill(shape=np.array(fill_shape, np.int32), value=np.float32(1), name="big")
            y = mb.add(x=x, y=big, name="y")
        func.set_outputs([y])
    prog = Program()
    prog.add_function("main", func)
    path = tmp_path / name
    ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
               minimum_deployment_target=ct.target.iOS16).save(str(path))
    return path


def root_item(package: Path):
    manifest = json.loads((package / "Manifest.json").read_text())
    return manifest, manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]


def repoint(package: Path, new_path: str) -> None:
    manifest, entry = root_item(package)
    entry["path"] = new_path
    (package / "Manifest.json").write_text(json.dumps(manifest))


def reach_outside(package: Path, how: str, elsewhere: Path) -> None:
    """Make `package` load the model of `elsewhere` (another package) in one of the ways of issue 15."""
    _, entry = root_item(package)
    if how == "absolute":
        repoint(package, str(elsewhere / "Data" / entry["path"]))
    elif how == "dotdot":
        repoint(package, os.path.relpath(elsewhere / "Data" / entry["path"], package / "Data"))
    elif how == "data_symlink":
        shutil.rmtree(package / "Data")
        (package / "Data").symlink_to(elsewhere / "Data")
    elif how == "weights_symlink":
        weights = package / "Data" / "com.apple.CoreML" / "weights"
        shutil.rmtree(weights, ignore_errors=True)
        weights.symlink_to(elsewhere / "Data" / "com.apple.CoreML" / "weights")


HOW = ("absolute", "dotdot", "data_symlink", "weights_symlink")


@pytest.mark.parametrize("how", HOW)
def test_runtime_refuses_a_package_that_reaches_outside_itself(tmp_path, how):
    elsewhere = small_program(tmp_path, "elsewhere.mlpackage")
    package = small_program(tmp_path, "victim.mlpackage")
    reach_outside(package, how, elsewhere)
    with pytest.raises(UserError, match=SAFE) as info:
        load_model(package, backend="mil")
    assert "victim.mlpackage" in str(info.value) and "\n" not in str(info.value)


def test_the_intact_package_still_loads(tmp_path):
    out = load_model(small_program(tmp_path), backend="mil").predict({"x": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(out["y"], [1, 1])


run_cli = support.run_pipeline_cli
assert_one_line = support.assert_one_line


def generate_argv(models, out):
    return ["--prompt", "a fox", "-i", str(models), "-o", str(out), "--backend", "mil", "--num-inference-steps", "1"]


@pytest.mark.parametrize("how", ("absolute", "dotdot", "data_symlink"))
def test_pipeline_refuses_a_unet_stored_elsewhere(capsys, tmp_path, tiny_models_dir, how):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    unet = next(models.glob("*_unet.mlpackage"))
    reach_outside(unet, how, next(tiny_models_dir.glob("*_unet.mlpackage")))
    code, err = run_cli(capsys, *generate_argv(models, tmp_path / "png"))
    assert_one_line(code, err, unet.name, SAFE)
    assert not (tmp_path / "png").exists()


# ------------------------------------------------------------------------------------------ bundles

def honest_zip(path, files: dict, compression=zipfile.ZIP_STORED):
    """A bundle zip with a manifest that lists every file truthfully (size and sha256)."""
    listed = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("b/manifest.json", json.dumps({"format": bundle.FORMAT, "files": listed}))
        for name, data in files.items():
            zf.writestr(f"b/{name}", data)
    return path


def package_files(package: Path, under: str) -> dict:
    return {f"{under}/{p.relative_to(package).as_posix()}": p.read_bytes()
            for p in sorted(package.rglob("*")) if p.is_file()}


def test_bundle_whose_package_names_a_file_outside_it_is_not_extracted(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHON_COREML_SD_CACHE", str(tmp_path / "cache"))
    elsewhere = small_program(tmp_path, "elsewhere.mlpackage")
    package = small_program(tmp_path, "Unet.mlpackage")
    reach_outside(package, "dotdot", elsewhere)
    archive = honest_zip(tmp_path / "evil.zip", package_files(package, "Unet.mlpackage"))  # every sha256 passes
    with pytest.raises(UserError, match=SAFE) as info:
        bundle.models_folder(archive)
    assert "evil.zip" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cache" / "bundles").exists() or not list((tmp_path / "cache" / "bundles").iterdir())


def test_zip_bomb_ratio_is_refused_before_writing(tmp_path):
    zeros = bytes(bundle.RATIO_EXEMPT_BYTES * 4)  # deflates about 1000x
    archive = honest_zip(tmp_path / "bomb.zip", {"Unet.mlpackage/Data/w.bin": zeros}, zipfile.ZIP_DEFLATED)
    assert archive.stat().st_size < len(zeros) / bundle.MAX_COMPRESSION_RATIO
    with pytest.raises(UserError, match=r"bomb\.zip: Unet\.mlpackage/Data/w\.bin inflates \d+x .*zip bomb"):
        bundle.extract_bundle(archive, tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]


def test_zip_bomb_total_size_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle.extract, "MAX_EXTRACTED_BYTES", 1000)
    archive = honest_zip(tmp_path / "big.zip", {"a.bin": bytes(600), "b.bin": bytes(600)})
    with pytest.raises(UserError, match=r"big\.zip would extract to .* GB, over .*MAX_EXTRACTED_BYTES"):
        bundle.extract_bundle(archive, tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zip"]


def test_zip_bomb_from_the_pipeline_cli_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHON_COREML_SD_CACHE", str(tmp_path / "cache"))
    archive = honest_zip(tmp_path / "bomb.zip", {"Unet.mlpackage/Data/w.bin": bytes(4 << 20)}, zipfile.ZIP_DEFLATED)
    code, err = run_cli(capsys, *generate_argv(archive, tmp_path / "png"))
    assert_one_line(code, err, "bomb.zip", "zip bomb")
    assert not (tmp_path / "png").exists()


# -------------------------------------------------------------------------------- load-time bound

def inflate_fill(package: Path, shape) -> None:
    """Rewrite the constant shape of the package's fill op in its spec (building it at that shape would
    allocate it in coremltools' builder)."""
    from coremltools.proto import Model_pb2

    _, entry = root_item(package)
    spec_path = package / "Data" / entry["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    shape_var = next(op.inputs["shape"].arguments[0].name for op in block.operations if op.type == "fill")
    const = next(op for op in block.operations if op.type == "const" and op.outputs[0].name == shape_var)
    const.attributes["val"].immediateValue.tensor.ints.values[:] = list(shape)
    spec_path.write_bytes(spec.SerializeToString())


def test_huge_fill_is_refused_before_allocating(tmp_path):
    package = small_program(tmp_path, fill_shape=[2, 2])
    inflate_fill(package, [27000, 27000])  # 2.7 GiB of fp32
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"small\.mlpackage: op 'big' of type 'fill' would allocate 2\.7 GiB at "
                                        r"load \(shape \[27000, 27000\]\).*MAX_LOAD_TENSOR_BYTES") as info:
        load_model(package, backend="mil")
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 10  # refused, not computed


def test_bound_applies_to_what_the_plan_folds(tmp_path, monkeypatch):
    """Under a lowered bound a 64x2 fill is refused too, and the unchanged package runs under the real one."""
    package = small_program(tmp_path, fill_shape=[64, 2])
    assert load_model(package, backend="mil").predict({"x": np.zeros(2, np.float32)})["y"].tolist() == [[1, 1]] * 64
    monkeypatch.setattr(bounds, "MAX_LOAD_TENSOR_BYTES", 256)  # the fill is 512 bytes
    with pytest.raises(UserError, match="would allocate"):
        load_model(package, backend="mil")
