"""Writing outputs safely: atomic replacement, and saving an ML Program without copying its weights.

Every output (packages, bundles, zips, extracted archives) goes through `replace_atomically`: written
at a temporary name beside the destination, then renamed, so an interrupted run never leaves a
half-written file, and an existing output is replaced only when the caller allows it.

Every package is also made reproducible (`make_reproducible`): the same inputs and flags give
byte-identical files, on another day too when SOURCE_DATE_EPOCH is set.
"""
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from unittest import mock

from .errors import UserError


def check_output_dir(path: Path) -> None:
    """Raise UserError unless `path` is, or can be made as, a writable folder. Creates nothing, so a
    command can check its output before its slow work and create the folder only after it."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot use {path} as output folder: {existing} is a file; pass another -o")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot create output folder {path}: {existing} is not writable; pass a writable -o")


def prepare_output_dir(path: Path) -> None:
    """Create the output folder of a command (after its input was checked), or a UserError; temporary
    files that killed runs left there are removed."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror}; pass a writable -o")
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} is not writable; pass a writable -o")
    remove_stale_temps(path)


# Temporary outputs are named .<final name>.tmp<pid>.<random>: a later run removes those of dead processes.
TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)\.[^.]+$")


def temp_prefix(final_name: str) -> str:
    return f".{final_name}.tmp{os.getpid()}."


def remove_stale_temps(folder: Path) -> list:
    """Remove what replace_atomically left behind in `folder` when its process was killed (SIGKILL, power
    loss): temp entries whose process no longer runs. Returns the removed paths."""
    removed = []
    for entry in Path(folder).iterdir():
        match = TEMP_NAME.match(entry.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replace_atomically(build, dest: Path, overwrite: bool) -> Path:
    """Run build(tmp_path) to write `dest`'s content at a temporary name beside it, then rename.

    An interrupted run leaves no half-written `dest`; an existing `dest` is replaced only with
    overwrite=True (callers skip existing outputs before doing any work).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} exists; pass --overwrite to replace it")
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), dir=dest.parent))
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
    else:
        shutil.move(source, path)
        mlmodel.is_temp_package = False
        save_spec(mlmodel._spec, _get_model_spec_path(str(path)))
    make_reproducible(path)


CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
# Any fixed namespace will do: identifiers only need to be unique within a package and stable.
MANIFEST_NAMESPACE = uuid.UUID("6f1d3c1e-8a52-5a8e-9d1b-2f0c6a7e4b39")


def make_reproducible(package: Path) -> None:
    """Rewrite the two files of a package that coremltools writes differently on every run:
    Manifest.json (random item UUIDs: ours are derived from each item's entry) and the model spec
    (protobuf map order, e.g. of the user metadata: serialized deterministically). The conversion
    date coremltools records is SOURCE_DATE_EPOCH's day where that is set (reproducible builds)."""
    package = Path(package)
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest["itemInfoEntries"]
    renamed = {old: str(uuid.uuid5(MANIFEST_NAMESPACE, json.dumps(entry, sort_keys=True)))
               for old, entry in entries.items()}
    root_entry = entries[manifest["rootModelIdentifier"]]
    _rewrite_spec(package / "Data" / root_entry["path"])
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in entries.items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    _ordinary_modes(package)


def _ordinary_modes(package: Path) -> None:
    """coremltools writes the spec through a private temp file (mode 0600): give every file and folder the
    modes of an ordinary output, so they are the same on every run and readable by the app's build."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (package, *package.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _rewrite_spec(spec_path: Path) -> None:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    metadata = spec.description.metadata.userDefined
    if epoch and CONVERSION_DATE_KEY in metadata:
        metadata[CONVERSION_DATE_KEY] = str(_epoch_date(epoch))
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))


def _epoch_date(epoch: str) -> datetime.date:
    try:
        return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).date()
    except (ValueError, OverflowError, OSError):
        raise UserError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in seconds; unset it or fix it")


def _has_exir_debug_handles(mlmodel) -> bool:
    """``save`` also writes a debug-handle map for ExecuTorch-exported programs; leave those to it."""
    from coremltools.converters.mil.mil.scope import ScopeSource

    prog = getattr(mlmodel, "_mil_program", None)
    return prog is not None and any(ScopeSource.EXIR_DEBUG_HANDLE in f._essential_scope_sources
                                    for f in prog.functions.values())


def read_program(spec, weights_dir: str, specification_version: int = None):
    """The PyMIL Program of an ML Program spec whose weight files lie in `weights_dir`: the one reader
    behind the MIL runtime (which checks an untrusted package first), the chunker and the palettizer."""
    from coremltools.converters.mil.frontend.milproto.load import load

    if spec.WhichOneof("Type") != "mlProgram":
        raise UserError(f"a Core ML '{spec.WhichOneof('Type')}' model is not an ML Program")
    return load(spec, specification_version=specification_version or spec.specificationVersion,
                file_weights_dir=weights_dir)


@contextlib.contextmanager
def unprinted_programs():
    """coremltools' pass pipelines log the whole program before and after each pipeline at DEBUG level,
    through f-strings built whatever the level: six texts of SDXL's UNet, 13 s of a palettization. Unless
    coremltools logs at DEBUG, a program's text is a placeholder while this is active."""
    from coremltools import _logger
    from coremltools.converters.mil.mil.program import Program

    if _logger.isEnabledFor(logging.DEBUG):
        yield
        return
    with mock.patch.object(Program, "__str__", lambda self, *args, **kwargs: "<program text: DEBUG logging only>"):
        yield


def mil_program(mlmodel, specification_version: int = None):
    """The PyMIL Program of a ``ct.models.MLModel`` (fresh from a conversion, or loaded from disk)."""
    return read_program(mlmodel.get_spec(), mlmodel.weights_dir, specification_version)

