"""Helpers several test files share (imported as `tests.support`; pytest.ini puts the repo on the path)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """A script of scripts/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_pipeline_cli(capsys, *argv):
    """(exit code, stderr) of `python -m python_coreml_sd.pipeline argv`, run in-process."""
    from python_coreml_sd import pipeline as pipeline_cli
    with pytest.raises(SystemExit) as exit_info:
        pipeline_cli.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def assert_one_line(code, err, *fragments, prog="pipeline"):
    """Exit 2 and one error line of `prog`, no traceback, holding each fragment."""
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith(f"{prog}: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def converted(model: str, out, components, **options) -> dict:
    """{package file name: path} of `components` of `model` converted into `out` with ConversionOptions `options`."""
    from python_coreml_sd.convert import ConversionOptions, convert
    return {p.name: p for p in convert(ConversionOptions(model_version=model, output_dir=out, **options), components)}
