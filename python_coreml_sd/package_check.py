"""Converted packages are untrusted input: every loader opens them through `load_spec` here.

An .mlpackage names its files in Manifest.json and coremltools (and Core ML) join those names onto
the package's Data folder as they are: an absolute path, a `..`, or a symlink (a linked `Data`, a
linked weight file) would load a model stored elsewhere on disk, even from a bundle whose every file
passed its sha256. `check_package` refuses any package with a file that lies outside it.
"""
import json
import os
from pathlib import Path

from .errors import UserError

MANIFEST = "Manifest.json"


def check_package(path) -> Path:
    """`path` unchanged, or a UserError naming the first file of the package that leaves it. A single
    .mlmodel file or a compiled .mlmodelc has no manifest: only its links are checked."""
    path = Path(path)
    if not path.is_dir():
        return path
    _refuse_links(path)
    if path.suffix == ".mlpackage" or (path / MANIFEST).exists():
        for item in _manifest_paths(path):
            _check_item(path, item)
    return path


def load_spec(path):
    """coremltools' `load_spec` of a checked package (the model's protobuf spec); a UserError if unreadable."""
    from coremltools.models.utils import load_spec as ct_load_spec

    path = check_package(path)
    if not path.exists():
        raise UserError(f"{path}: no such model file or package")
    try:
        return ct_load_spec(str(path))
    except Exception as exc:  # protobuf or package errors: the file is not a Core ML model
        raise UserError(f"{path}: not a Core ML model ({type(exc).__name__}: {exc}); re-convert it") from None


def _unsafe(package: Path, why: str) -> UserError:
    return UserError(f"{package} is not a self-contained Core ML package ({why}); refusing to load files from "
                     "outside it: re-convert it with torch2coreml or re-extract its bundle")


def _refuse_links(package: Path) -> None:
    # os.walk does not follow links to folders, so a linked Data/ is seen here, not entered.
    for folder, dirs, files in os.walk(package):
        for name in sorted(dirs + files):
            entry = Path(folder) / name
            if entry.is_symlink():
                raise _unsafe(package, f"{entry.relative_to(package)} is a symbolic link")


def _manifest_paths(package: Path) -> list:
    try:
        manifest = json.loads((package / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["itemInfoEntries"]
        paths = [entry["path"] for entry in entries.values()]
    except FileNotFoundError:
        raise _unsafe(package, f"no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _unsafe(package, f"{MANIFEST} is not a package manifest: {type(exc).__name__}") from None
    if not all(isinstance(p, str) for p in paths):
        raise _unsafe(package, f"{MANIFEST} names an item path that is not a string")
    return paths


def _check_item(package: Path, item: str) -> None:
    parts = item.replace("\\", "/").split("/")
    if item.startswith(("/", "\\")) or (len(item) > 1 and item[1] == ":") or ".." in parts or "\0" in item:
        raise _unsafe(package, f"{MANIFEST} item path {item!r} is absolute or contains '..'")
    data = (package / "Data").resolve()
    target = (package / "Data" / item).resolve()
    if target != data and data not in target.parents:
        raise _unsafe(package, f"{MANIFEST} item path {item!r} resolves to {target}")
