"""Saving converted models: atomic, never clobbering, and a fresh package is moved rather than copied."""
import os

import coremltools as ct
import pytest

from python_coreml_sd.compression import testbed
from python_coreml_sd.errors import UserError
from python_coreml_sd.package_io import save_mlmodel


def fresh_model(tmp_path):
    net, inputs = testbed.small_net()
    return ct.models.MLModel(str(testbed.convert(net, inputs, tmp_path / "src.mlpackage")), skip_model_load=True)


def test_fresh_package_is_moved_with_the_in_memory_spec(tmp_path):
    import coremltools.optimize.coreml as cto

    # A compressed model lives in a temporary package, as a fresh conversion does.
    model = cto.palettize_weights(fresh_model(tmp_path), cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(mode="uniform", nbits=4)))
    temp_package = model.package_path
    model.user_defined_metadata["com.example.note"] = "set after conversion"
    model.short_description = "described after conversion"
    out = save_mlmodel(model, tmp_path / "out.mlpackage", overwrite=False)
    assert not os.path.exists(temp_package)  # moved, not copied
    saved = ct.models.MLModel(str(out), skip_model_load=True)
    assert saved.user_defined_metadata["com.example.note"] == "set after conversion"
    assert saved.short_description == "described after conversion"
    assert (out / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mlpackage", "src.mlpackage"]


def test_loaded_package_is_copied_and_existing_output_kept(tmp_path):
    model = fresh_model(tmp_path)  # loaded from disk: its package is the user's, never moved
    out = save_mlmodel(model, tmp_path / "out.mlpackage", overwrite=False)
    assert (tmp_path / "src.mlpackage").is_dir() and out.is_dir()
    with pytest.raises(UserError, match="exists"):
        save_mlmodel(model, out, overwrite=False)


def test_temp_outputs_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    import os
    import subprocess
    import sys
    from python_coreml_sd.package_io import prepare_output_dir, temp_prefix
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.mlpackage.tmp{dead_pid}.k2j3"
    (stale / "Data").mkdir(parents=True)
    stale_file = tmp_path / f".image.png.tmp{dead_pid}.x9"
    stale_file.write_bytes(b"half")
    ours = tmp_path / (temp_prefix("other.zip") + "q1")  # this process's own temp: still being written
    ours.mkdir()
    unrelated = tmp_path / ".hidden.tmp"
    unrelated.write_text("keep")
    prepare_output_dir(tmp_path)
    assert not stale.exists() and not stale_file.exists()
    assert ours.exists() and unrelated.exists() and str(os.getpid()) in ours.name


def test_program_text_is_built_only_when_coremltools_logs_at_debug(tmp_path):
    """coremltools' pipelines format the whole program into DEBUG log lines whatever the level; inside
    unprinted_programs the text is a placeholder, unless DEBUG logging is on, and the real text after."""
    import logging

    from coremltools import _logger

    from python_coreml_sd.package_io import mil_program, unprinted_programs

    prog = mil_program(fresh_model(tmp_path))
    text = str(prog)
    assert "main" in text and len(text) > 200
    with unprinted_programs():
        assert str(prog) == f"{prog}" == "<program text: DEBUG logging only>"
    assert str(prog) == text
    level = _logger.level
    _logger.setLevel(logging.DEBUG)
    try:
        with unprinted_programs():
            assert str(prog) == text
    finally:
        _logger.setLevel(level)
