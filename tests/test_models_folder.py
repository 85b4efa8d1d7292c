"""A models folder the pipeline cannot use as it is (issue 15): a package without the inputs the
pipeline feeds, two models' packages of one component. One line and exit 2, no PNG."""
import json
import shutil
from pathlib import Path

import pytest

from tests import support

from python_coreml_sd.errors import UserError
from python_coreml_sd.generation.components import find_packages


run_cli = support.run_pipeline_cli
assert_one_line = support.assert_one_line


def generate_argv(models, out):
    return ["--prompt", "a fox", "-i", str(models), "-o", str(out), "--backend", "mil", "--num-inference-steps", "1"]


def spec_path(package: Path) -> Path:
    manifest = json.loads((package / "Manifest.json").read_text())
    return package / "Data" / manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]

def rename_input(package: Path, old: str, new: str) -> None:
    """The package's function input `old` renamed `new` (spec description and program)."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path(package).read_bytes())
    for feature in spec.description.input:
        if feature.name == old:
            feature.name = new
    function = spec.mlProgram.functions["main"]
    for value in function.inputs:
        if value.name == old:
            value.name = new
    for block in function.block_specializations.values():
        for op in block.operations:
            for argument in op.inputs.values():
                for binding in argument.arguments:
                    if binding.name == old:
                        binding.name = new
    spec_path(package).write_bytes(spec.SerializeToString())


def test_unet_with_a_renamed_input(capsys, tmp_path, tiny_models_dir):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    unet = next(models.glob("*_unet.mlpackage"))
    rename_input(unet, "sample", "x")
    code, err = run_cli(capsys, *generate_argv(models, tmp_path / "png"))
    assert_one_line(code, err, unet.name, "has no input 'sample'", "reconvert")
    assert not (tmp_path / "png").exists()
    code, err = run_cli(capsys, *generate_argv(models, tmp_path / "png"), "--backend", "torch")  # reads the latent size
    assert_one_line(code, err, unet.name, "has no input 'sample'")


def test_folder_with_two_models_unets(capsys, tmp_path, tiny_models_dir):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    ours = next(models.glob("*_unet.mlpackage"))
    other = models / "Stable_Diffusion_version_other_unet.mlpackage"
    shutil.copytree(ours, other)
    with pytest.raises(UserError, match=rf"holds 2 unet packages \({other.name}, {ours.name}\); pass --model-version"):
        find_packages(models)
    assert find_packages(models, "tiny")["unet"] == ours  # the one converted from --model-version
    other.rename(models / "Stable_Diffusion_version_another_unet.mlpackage")
    ours.rename(models / "Stable_Diffusion_version_third_unet.mlpackage")
    code, err = run_cli(capsys, *generate_argv(models, tmp_path / "png"))
    assert_one_line(code, err, "holds 2 unet packages", "Stable_Diffusion_version_another_unet.mlpackage",
                    "Stable_Diffusion_version_third_unet.mlpackage", "--model-version")
    assert not (tmp_path / "png").exists()
