"""Pickled `.bin` weights are refused, never loaded (issue 15): one line that names the file and how to
convert it to safetensors, exit 2, from torch2coreml, pipeline --backend torch, parity and mixed_bit.

The pickles here would create a marker file when unpickled, so a test also proves none was loaded."""
import pickle
import shutil
from pathlib import Path

import pytest

from python_coreml_sd import parity, pipeline, torch2coreml
from python_coreml_sd.compression import mixed_bit

FILE_NAMES = {"text_encoder": ("model.safetensors", "pytorch_model.bin"),
              "safety_checker": ("model.safetensors", "pytorch_model.bin"),
              "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")}


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a hostile checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.fixture
def pickled_model(tmp_path, tiny_source):
    """pickled_model(component) -> a copy of `tiny` whose component holds its weights only as a pickle."""
    marker = tmp_path / "unpickled"

    def make(component):
        model = tmp_path / f"model-{component}"
        shutil.copytree(tiny_source.root, model)
        safetensors, pickled = FILE_NAMES[component]
        (model / component / safetensors).unlink()
        (model / component / pickled).write_bytes(pickle.dumps({"weight": _RunsCode(marker)}))
        return model

    yield make
    assert not marker.exists(), "a pickle was loaded"


def run(main, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


def assert_refused(code, err, prog, pickled: Path):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith(f"{prog}: error:") and "Traceback" not in err, err
    assert f"{pickled} is a pickled PyTorch checkpoint" in err and "weights_only=True" in err, err
    assert "weights_only=False" not in err
    safetensors = next(names[0] for names in FILE_NAMES.values() if names[1] == pickled.name)
    assert f"'{pickled.with_name(safetensors)}'" in err, err  # the name the loaders look for


@pytest.mark.parametrize("component, flag", [("text_encoder", "--convert-text-encoder"),
                                             ("safety_checker", "--convert-safety-checker"),
                                             ("unet", "--convert-unet")])
def test_torch2coreml(capsys, tmp_path, pickled_model, component, flag):
    model = pickled_model(component)
    code, err = run(torch2coreml.main, capsys, [flag, "--model-version", str(model), "-o", str(tmp_path / "out")])
    assert_refused(code, err, "torch2coreml", model / component / FILE_NAMES[component][1])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("component", ["text_encoder", "safety_checker"])
def test_pipeline_torch_backend(capsys, tmp_path, pickled_model, component):
    model = pickled_model(component)
    code, err = run(pipeline.main, capsys, ["--prompt", "a fox", "--backend", "torch", "--model-version", str(model),
                                            "-o", str(tmp_path / "png"), "--num-inference-steps", "1"])
    assert_refused(code, err, "pipeline", model / component / FILE_NAMES[component][1])
    assert not (tmp_path / "png").exists()


def test_parity(capsys, tmp_path, pickled_model, tiny_models_dir):
    model = pickled_model("safety_checker")
    code, err = run(parity.main, capsys, ["--prompt", "a fox", "-i", str(tiny_models_dir), "--model-version", str(model),
                                          "-o", str(tmp_path / "report"), "--num-inference-steps", "1"])
    assert_refused(code, err, "parity", model / "safety_checker" / "pytorch_model.bin")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("where", ["--model-version", "--unet-dir"])
def test_mixed_bit(capsys, tmp_path, pickled_model, where):
    model = pickled_model("unet")
    code, err = run(mixed_bit.main, capsys, [where, str(model if where == "--model-version" else model / "unet"),
                                             "--target-bits", "4", "--out", str(tmp_path / "recipe.json")])
    assert_refused(code, err, "mixed_bit", model / "unet" / "diffusion_pytorch_model.bin")
    assert not (tmp_path / "recipe.json").exists()
