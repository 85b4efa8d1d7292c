"""Writing outputs safely: atomic replacement, and saving an ML Program without copying its weights.

Every output (packages, bundles, zips, extracted archives) goes through `replace_atomically`: written
at a temporary name beside the destination, then renamed, so an interrupted run never leaves a
half-written file, and an existing output is replaced only when the caller allows it.
"""
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def replace_atomically(build, dest: Path, overwrite: bool) -> Path:
    """Run build(tmp_path) to write `dest`'s content at a temporary name beside it, then rename.

    An interrupted run leaves no half-written `dest`; an existing `dest` is replaced only with
    overwrite=True (callers skip existing outputs before doing any work).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} exists; pass --overwrite to replace it")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp = tmp_dir / dest.name
        build(tmp)
        if dest.exists():
            old = tmp_dir / (dest.name + ".old")
            os.rename(dest, old)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def save_mlmodel(mlmodel, dest: Path, overwrite: bool) -> Path:
    """Save a ``ct.models.MLModel`` to ``dest`` atomically. The model must not be used afterwards."""
    return replace_atomically(lambda tmp: _write_package(mlmodel, tmp), dest, overwrite)


def _write_package(mlmodel, path: Path) -> None:
    """``mlmodel.save(path)``, but a package coremltools made in a temporary folder (every fresh
    conversion or compression) is moved, not copied: a rename instead of rewriting 0.6-1.7 GB of
    weights. The in-memory spec (descriptions, metadata set after conversion) is written over the
    moved one, as ``save`` does. coremltools' exit hook skips a temporary package that is gone."""
    from coremltools.models.utils import _get_model_spec_path, save_spec

    source = getattr(mlmodel, "package_path", None)
    movable = (getattr(mlmodel, "is_package", False) and getattr(mlmodel, "is_temp_package", False)
               and source and os.path.isdir(source) and not _has_exir_debug_handles(mlmodel))
    if not movable:
        mlmodel.save(str(path))
        return
    shutil.move(source, path)
    mlmodel.is_temp_package = False
    save_spec(mlmodel._spec, _get_model_spec_path(str(path)))


def _has_exir_debug_handles(mlmodel) -> bool:
    """``save`` also writes a debug-handle map for ExecuTorch-exported programs; leave those to it."""
    from coremltools.converters.mil.mil.scope import ScopeSource

    prog = getattr(mlmodel, "_mil_program", None)
    return prog is not None and any(ScopeSource.EXIR_DEBUG_HANDLE in f._essential_scope_sources
                                    for f in prog.functions.values())
