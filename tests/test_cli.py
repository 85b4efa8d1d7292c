"""torch2coreml's command line: bad input ends with one line and exit code 2, outputs are atomic."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from python_coreml_sd import torch2coreml


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("torch2coreml: error:"), err
    assert fragment in err


@pytest.mark.parametrize("argv, fragment", [
    ([], "nothing to convert"),
    (["--convert-unet", "--latent-h", "0"], "--latent-h: 0 must be at least 1"),
    (["--convert-unet", "--latent-w", "abc"], "'abc' is not a whole number"),
    (["--convert-text-encoder", "--compute-precision", "float8"], "invalid choice: 'float8'"),
    (["--convert-unet", "--attention-implementation", "FAST"], "invalid choice: 'FAST'"),
    (["--convert-text-encoder", "--min-deployment-target", "iOS15"], "invalid choice: 'iOS15'"),
    (["--convert-text-encoder", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags(capsys, argv, fragment):
    assert_one_line_error(*run_main(capsys, *argv), fragment)


def test_missing_model_folder(capsys, tmp_path):
    code, err = run_main(capsys, "--convert-text-encoder", "--model-version", str(tmp_path / "nope"), "-o",
                         str(tmp_path / "out"))
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "out").exists()  # bad input creates nothing


@pytest.mark.parametrize("argv, fragment", [
    (["--convert-unet", "--latent-h", "7"], "--latent-h 7 is not a multiple of 4"),
    (["--convert-vae-decoder", "--latent-h", "100000", "--latent-w", "100000"], "--latent-h 100000 is larger than 512"),
    (["--convert-text-encoder", "--text-token-sequence-length", "1000"], "exceeds the text encoder's 77 positions"),
])
def test_sizes_are_checked_before_any_work(capsys, tmp_path, argv, fragment):
    code, err = run_main(capsys, "--model-version", "tiny", "-o", str(tmp_path / "out"), *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda m: (m / "model_index.json").write_text("{not json"), "model_index.json is not readable JSON"),
    (lambda m: (m / "model_index.json").write_bytes(b"\xff\xfe\x00binary"), "model_index.json is not readable JSON"),
    (lambda m: (m / "model_index.json").write_text("[1, 2]"), "model_index.json holds a JSON list"),
    (lambda m: (m / "unet" / "config.json").write_text("{"), "config.json is not readable JSON"),
    (lambda m: (m / "unet" / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((m / "unet" / "config.json").read_text()).items() if k != "sample_size"})),
     "config.json has no 'sample_size'"),
    (lambda m: (m / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00"),
     "is not a valid safetensors file"),
])
def test_damaged_model_folders(capsys, tmp_path, tiny_source, damage, fragment):
    model = tmp_path / "model"
    shutil.copytree(tiny_source.root, model)
    damage(model)
    code, err = run_main(capsys, "--convert-unet", "--model-version", str(model), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, fragment)


def test_output_folder_named_like_the_registry_model(capsys, tmp_path, monkeypatch):
    """`-o tiny` for `--model-version tiny`: the (new, then existing) output folder does not shadow the
    registry name, on the first run and on a rerun that keeps the existing package."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert torch2coreml.main(["--model-version", "tiny", "--convert-text-encoder", "-o", "tiny"]) == 0
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["Stable_Diffusion_version_tiny_text_encoder.mlpackage"]
    capsys.readouterr()
    code, err = run_main(capsys, "--model-version", "./tiny", "--convert-text-encoder", "-o", "elsewhere")
    assert_one_line_error(code, err, "is not a diffusers model folder")  # an explicit path stays a path
    assert not (tmp_path / "elsewhere").exists()


def test_folder_without_requested_component(capsys, tmp_path, sd2_source):
    code, err = run_main(capsys, "--convert-text-encoder", "--convert-safety-checker", "--model-version",
                         str(sd2_source.root), "-o", str(tmp_path))
    assert_one_line_error(code, err, "has no safety_checker")
    assert list(tmp_path.iterdir()) == []  # checked before converting anything


def test_unsupported_model_class(capsys, tmp_path, tiny_source):
    model = tmp_path / "model"
    shutil.copytree(tiny_source.root, model)
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    code, err = run_main(capsys, "--convert-text-encoder", "--model-version", str(model), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unsupported text_encoder class 'T5EncoderModel'")


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_main(capsys, "--convert-text-encoder", "-o", str(blocker / "sub"))
    assert_one_line_error(code, err, "cannot create output folder")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in torch2coreml.parser_spec()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.option_strings


def test_existing_output_is_skipped_then_replaced_with_overwrite(capsys, tmp_path):
    assert torch2coreml.main(["--convert-vae-decoder", "-o", str(tmp_path)]) == 0
    package = tmp_path / "Stable_Diffusion_version_tiny_vae_decoder.mlpackage"
    marker = package / "marker"
    marker.write_text("kept")
    assert torch2coreml.main(["--convert-vae-decoder", "-o", str(tmp_path)]) == 0
    assert marker.exists()  # skipped
    assert torch2coreml.main(["--convert-vae-decoder", "-o", str(tmp_path), "--overwrite"]) == 0
    assert not marker.exists() and (package / "Manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [package.name]  # no temp or .old leftovers


def test_interrupted_conversion_leaves_nothing(monkeypatch, capsys, tmp_path):
    from python_coreml_sd import package_io

    def interrupted_write(mlmodel, path):
        (__import__("pathlib").Path(path) / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(package_io, "_write_package", interrupted_write)
    code, err = run_main(capsys, "--convert-vae-decoder", "-o", str(tmp_path))
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "python_coreml_sd.torch2coreml", "--convert-text-encoder",
                             "--model-version", str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("torch2coreml: error:")


@pytest.mark.parametrize("when", ["start-up", "converting"])
def test_ctrl_c_is_one_line_and_exit_130_from_the_first_second(tmp_path, when):
    """SIGINT during the start-up imports or during a conversion: one line, exit 130, nothing kept. The child
    starts with SIGINT ignored, as a shell's background job does: the CLI must still honour it."""
    import signal
    import time
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "python_coreml_sd.torch2coreml", "--model-version", "tiny",
                              "--convert-unet", "-o", str(out)], stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    if when == "start-up":  # as soon as the child catches SIGINT: its first lines ran, the slow imports have not
        status = Path(f"/proc/{child.pid}/status")
        if not status.exists():
            child.kill()
            pytest.skip("needs Linux's /proc to see when the child catches SIGINT")
        while not int(next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:")).split()[1],
                      16) & (1 << (signal.SIGINT - 1)):
            time.sleep(0.01)
        lines = []
    else:
        lines = [child.stderr.readline()]
        while "unet: converting" not in lines[-1]:
            assert lines[-1], lines  # the child ended before it started converting
            lines.append(child.stderr.readline())
        time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    lines += child.stderr.read().splitlines()
    assert child.wait(timeout=60) == 130
    ours = [line for line in lines if line.startswith("torch2coreml:")]
    assert ours == ["torch2coreml: error: interrupted; no partial output was kept"], lines
    assert not any("Traceback" in line for line in lines)
    assert not out.exists() or list(out.iterdir()) == []


def test_existing_outputs_are_reused_only_when_made_with_the_same_flags(capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["--model-version", "tiny", "--convert-text-encoder", "-o", str(out)]
    assert torch2coreml.main(argv + ["--text-token-sequence-length", "16"]) == 0
    package = out / "Stable_Diffusion_version_tiny_text_encoder.mlpackage"
    before = (package / "Manifest.json").stat().st_mtime_ns
    assert torch2coreml.main(argv + ["--text-token-sequence-length", "16"]) == 0  # same flags: kept
    assert (package / "Manifest.json").stat().st_mtime_ns == before
    capsys.readouterr()
    code, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, "was made with other flags: text_token_sequence_length=16")
    shutil.rmtree(package)
    package.mkdir()  # an empty folder where the package should be
    code, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, "exists but is not a readable .mlpackage")
