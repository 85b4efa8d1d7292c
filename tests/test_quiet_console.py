"""Other libraries' log lines and warnings never precede a CLI's one-line error (issue 15).

Each CLI runs in its own process (logging is configured once per process) with its work replaced by a
function that logs and warns the way torch, coremltools or huggingface_hub do, then fails."""
import subprocess
import sys

import pytest

CHATTER = """
import logging, runpy, sys, warnings
import {module} as cli
from python_coreml_sd.errors import UserError

def chatty(*args, **kwargs):
    logging.getLogger("huggingface_hub").warning("third-party warning line")
    logging.getLogger("some.library").info("third-party info line")
    logging.getLogger("coremltools").warning("coremltools warning line")
    warnings.warn("third-party UserWarning", UserWarning)
    warnings.warn("third-party FutureWarning", FutureWarning)
    raise UserError("bad input named here; the fix")

setattr(cli, "{work}", chatty)
sys.exit(cli.main(sys.argv[1:]))
"""

CLIS = [
    ("python_coreml_sd.torch2coreml", "convert", "torch2coreml", ["--convert-text-encoder", "-o", "{tmp}/out"]),
    ("python_coreml_sd.pipeline", "generate_images", "pipeline", ["--prompt", "a fox", "-o", "{tmp}/png"]),
    ("python_coreml_sd.parity", "run_parity", "parity", ["--prompt", "a fox", "-o", "{tmp}/report"]),
    ("python_coreml_sd.compression.mixed_bit", "run", "mixed_bit", ["--target-bits", "4", "--out", "{tmp}/r.json"]),
]


@pytest.mark.parametrize("module, work, prog, argv", CLIS, ids=[c[2] for c in CLIS])
def test_error_is_the_only_line(tmp_path, module, work, prog, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = subprocess.run([sys.executable, "-c", CHATTER.format(module=module, work=work), *argv],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"{prog}: error: bad input named here; the fix\n", result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
