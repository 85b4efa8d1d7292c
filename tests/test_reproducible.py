"""Byte-reproducible outputs: the same model and flags give identical packages and zips (sha256)."""
import hashlib
import json
import shutil
import uuid

import pytest

from python_coreml_sd import package_io, torch2coreml
from python_coreml_sd.components import CONTROL, FLAGGED, TABLE
from python_coreml_sd.errors import UserError

EPOCH_2001 = "978307200"  # 2001-01-01T00:00:00Z


def tree_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_metadata(package):
    import coremltools as ct
    return dict(ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The README's first command's conversion, with a bundle and its zip, run through the CLI."""
    out = tmp_path_factory.mktemp("reproducible")
    argv = ["--model-version", "tiny", "-o", str(out), "--bundle-packages", "--zip",
            *(TABLE[c].flag for c in FLAGGED if c not in CONTROL)]  # ControlNets take models
    assert torch2coreml.main(argv) == 0
    return out


def test_two_conversions_give_identical_packages_and_zips(cli_run, tiny_models_dir, tmp_path):
    """Run 1: the CLI above. Run 2: the session's own conversion of the same model with the same flags
    (another process-level history: other conversions ran before it), bundled by the CLI."""
    packages = sorted(cli_run.glob("*.mlpackage"))
    assert len(packages) == 5
    for package in packages:
        assert tree_hashes(package) == tree_hashes(tiny_models_dir / package.name), package.name
    second = tmp_path / "second"
    second.mkdir()
    for package in packages:
        shutil.copytree(tiny_models_dir / package.name, second / package.name)
    argv = ["--model-version", "tiny", "-o", str(second), "--bundle-packages", "--zip",
            *(TABLE[c].flag for c in FLAGGED if c not in CONTROL)]  # ControlNets take models
    assert torch2coreml.main(argv) == 0  # keeps the packages, bundles and zips them
    (zip_a,), (zip_b,) = cli_run.glob("*.zip"), second.glob("*.zip")
    assert zip_a.name == zip_b.name
    assert hashlib.sha256(zip_a.read_bytes()).digest() == hashlib.sha256(zip_b.read_bytes()).digest()
    assert tree_hashes(cli_run / "Resources") == tree_hashes(second / "Resources")


def test_manifest_identifiers_come_from_the_entries_not_from_chance(tiny_models_dir, tmp_path):
    source = next(tiny_models_dir.glob("*_vae_decoder.mlpackage"))
    package = shutil.copytree(source, tmp_path / source.name)
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    fresh = {old: str(uuid.uuid4()).upper() for old in manifest["itemInfoEntries"]}  # as another writer would
    manifest["itemInfoEntries"] = {fresh[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = fresh[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest))
    assert tree_hashes(package) != tree_hashes(source)
    package_io.make_reproducible(package)
    assert tree_hashes(package) == tree_hashes(source)
    from python_coreml_sd.runtime import load_model
    assert "image" in load_model(package, backend="mil").plan.output_names  # still loads


def test_source_date_epoch_fixes_the_conversion_date(tiny_models_dir, tmp_path, monkeypatch):
    source = next(tiny_models_dir.glob("*_text_encoder.mlpackage"))
    package = shutil.copytree(source, tmp_path / source.name)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH_2001)
    package_io.make_reproducible(package)
    metadata = user_metadata(package)
    assert metadata[package_io.CONVERSION_DATE_KEY] == "2001-01-01"
    assert metadata["com.python_coreml_sd.component"] == "text_encoder"  # the rest is kept
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UserError, match="SOURCE_DATE_EPOCH='yesterday' is not a Unix time"):
        package_io.make_reproducible(package)


def test_package_files_have_ordinary_modes(cli_run):
    import os
    import stat
    umask = os.umask(0)
    os.umask(umask)
    package = next(cli_run.glob("*_text_encoder.mlpackage"))
    for path in (package, *package.rglob("*")):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path  # coremltools wrote model.mlmodel 0600
