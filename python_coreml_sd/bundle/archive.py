"""Reproducible zip archives of Resources/ folders: stored entries at zip's epoch, sorted, with a
manifest.json holding every file's sha256 and how the models were made."""
import dataclasses
import json
import shutil
import stat
import zipfile
from pathlib import Path

from .._version import __version__
from ..errors import UserError
from ..model_cache import sha256_file
from ..package_io import replace_atomically

MANIFEST = "manifest.json"
FORMAT = "python_coreml_sd.bundle/1"
KINDS = ("packages", "compiled")
# Zip's epoch: entries carry no build time, so the same files always give the same bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
# Options that do not change the models: leaving them out keeps the manifest (and sha256) stable.
NOT_MODEL_FLAGS = {"output_dir", "overwrite", "check_output_correctness", "psnr_threshold"}
CHUNK = 1 << 20


def zip_name(options, kind: str) -> str:
    """Named like the published archives: coreml-<model>[-palettized]_<attention>_<compiled|packages>.zip."""
    path = Path(options.model_version).expanduser()
    model = path.resolve().name if path.exists() else options.model_version.rstrip("/").split("/")[-1]
    palettized = getattr(options, "quantize_nbits", None) or getattr(options, "mixed_bit_recipe", None)
    return f"coreml-{model}{'-palettized' if palettized else ''}_{options.attention_implementation.lower()}_{kind}.zip"


def model_flags(options) -> dict:
    values = dataclasses.asdict(options)
    return {k: v for k, v in sorted(values.items()) if k not in NOT_MODEL_FLAGS}


def manifest_fields(options, kind: str, resources_dir) -> dict:
    """Everything the manifest says besides the files: where the models come from and how they were made."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    components = sorted(p.name.rsplit(".", 1)[0] for p in Path(resources_dir).iterdir()
                        if p.suffix in (".mlpackage", ".mlmodelc"))
    return {"format": FORMAT, "kind": kind, "source_model": options.model_version,
            "converter": "python_coreml_sd", "converter_version": __version__,
            "flags": model_flags(options), "components": components}


def bundle_files(resources_dir: Path) -> list:
    """Relative POSIX paths of the files under `resources_dir`, sorted; links and special files refused."""
    files = []
    for path in sorted(resources_dir.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UserError(f"{path} is a link or a special file; bundles hold plain files only")
        if path.is_file():
            files.append(path.relative_to(resources_dir).as_posix())
    if MANIFEST in files:
        files.remove(MANIFEST)  # rewritten below: an old manifest must not describe itself
    return sorted(files)


def _zip_info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    # Stored, not deflated: deflate's bytes depend on the zlib build (zlib and zlib-ng differ), which would
    # break "same files, same sha256" across machines; fp16 and palettized weights shrink only a few % anyway.
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, so that the permission bits below mean the same everywhere
    info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
    info.file_size = size  # lets zipfile choose zip64 up front for files over 2 GiB
    return info


def make_zip(resources_dir, dest_zip, manifest_fields: dict, overwrite: bool = False) -> Path:
    """Archive `resources_dir` as `dest_zip` with a manifest.json (sizes and sha256 of every file).

    Entries sit under one folder named like the archive, in sorted order, with fixed timestamps and
    permissions: the same files give the same bytes, so the archive's sha256 identifies its content.
    """
    resources_dir, dest_zip = Path(resources_dir), Path(dest_zip)
    files = bundle_files(resources_dir)
    listing = {rel: {"size": (resources_dir / rel).stat().st_size, "sha256": sha256_file(resources_dir / rel)}
               for rel in files}
    manifest = {**manifest_fields, "files": listing, "total_size": sum(v["size"] for v in listing.values())}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
    top = dest_zip.name[:-4] if dest_zip.name.endswith(".zip") else dest_zip.name

    def build(tmp: Path):
        with zipfile.ZipFile(tmp, "w") as archive:
            for rel in sorted(files + [MANIFEST]):
                if rel == MANIFEST:
                    archive.writestr(_zip_info(f"{top}/{rel}", len(manifest_bytes)), manifest_bytes)
                else:
                    _add_file(archive, resources_dir / rel, _zip_info(f"{top}/{rel}", listing[rel]["size"]))

    return replace_atomically(build, dest_zip, overwrite)


def _add_file(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo) -> None:
    with open(path, "rb") as src, archive.open(info, "w") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
