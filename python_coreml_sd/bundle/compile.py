"""Compiling packages to .mlmodelc with Xcode's coremlcompiler (macOS only)."""
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError


def require_compiler() -> None:
    """Raise UserError unless `xcrun coremlcompiler` can run here (called before any conversion work)."""
    if platform.system() != "Darwin":
        raise UserError("--bundle-resources-for-swift-cli compiles with Xcode's coremlcompiler, which exists only on "
                        "macOS; here use --bundle-packages (with --zip for an archive) and compile on a Mac")
    if shutil.which("xcrun") is None:
        raise UserError("--bundle-resources-for-swift-cli needs xcrun (install Xcode or run xcode-select --install); "
                        "or use --bundle-packages")


def compile_package(package: Path, out_dir: Path, name: str) -> Path:
    # coremlcompiler names its output after the input's stem, so compile in a scratch folder and rename.
    with tempfile.TemporaryDirectory(prefix=".compile.", dir=out_dir) as scratch:
        result = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), scratch],
                                capture_output=True, text=True)
        compiled = Path(scratch) / f"{package.stem}.mlmodelc"
        if result.returncode != 0 or not compiled.is_dir():
            detail = (result.stderr or result.stdout or "").strip().splitlines()
            raise UserError(f"xcrun coremlcompiler could not compile {package.name} (exit {result.returncode}"
                            f"{': ' + detail[-1] if detail else ''})")
        target = out_dir / f"{name}.mlmodelc"
        target.parent.mkdir(parents=True, exist_ok=True)  # controlnet/<name>
        os.rename(compiled, target)
    return target
