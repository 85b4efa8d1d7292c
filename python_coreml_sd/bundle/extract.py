"""Safe extraction of bundle archives (untrusted input): paths, links, sizes, ratios and free space checked
from the archive's directory before anything is written, every file against the manifest's sha256; and
the extraction cache behind `-i bundle.zip`."""
import hashlib
import json
import os
import shutil
import stat
import re
import zipfile
from pathlib import Path

from ..errors import UserError
from ..package_io import replace_atomically
from .archive import CHUNK, FILE_MODE, FORMAT, MANIFEST, sha256_file

# Zip-bomb caps, checked from the archive's directory before anything is written. The largest real
# bundle, SDXL with both text encoders, is about 7 GB; make_zip stores entries (ratio 1), and deflate
# cannot pass about 1030x, so a higher ratio is crafted. Small files may compress well and cannot be bombs.
MAX_EXTRACTED_BYTES = 32 << 30
MAX_COMPRESSION_RATIO = 100
RATIO_EXEMPT_BYTES = 1 << 20


def extract_bundle(zip_path, dest, overwrite: bool = False) -> Path:
    """Extract a bundle archive made by make_zip into `dest` (which becomes the Resources folder).

    Refuses entries that would land outside `dest` (`..`, absolute paths, drive letters, backslashes),
    links and special files, files the manifest does not list (or lists with another size), and any
    file whose sha256 differs from the manifest's. Everything is written into a temporary folder
    beside `dest` and renamed into place only once every file checked out.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} exists; remove it or choose another folder to extract {zip_path.name} into")
    with _open_zip(zip_path) as archive:
        entries = _checked_entries(archive, zip_path)
        manifest = _read_manifest(archive, entries, zip_path)
        _check_listing(entries, manifest, zip_path)
        _check_caps(entries, zip_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(dest.parent, manifest["total_size"], zip_path)
        replace_atomically(lambda tmp: _extract_all(archive, entries, manifest, tmp, zip_path), dest, overwrite)
    return dest


def _check_packages(root: Path, zip_path: Path) -> None:
    """Every file passing its sha256 does not make a package safe: its Manifest.json could still name
    files outside it. Checked before the extraction is renamed into place."""
    from ..package_check import check_package
    for package in sorted(root.rglob("*.mlpackage")):
        try:
            check_package(package)
        except UserError as exc:
            raise UserError(f"{zip_path.name}: {exc}") from None


def _open_zip(zip_path: Path) -> zipfile.ZipFile:
    if not zip_path.is_file():
        raise UserError(f"bundle {zip_path} does not exist")
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{zip_path} is not a readable zip archive ({exc})") from exc


def safe_parts(name: str, zip_path: Path) -> tuple:
    """The path components of an entry name, or UserError if the name could leave the target folder."""
    bad = None
    if "\\" in name or "\0" in name:
        bad = "a backslash or NUL in its name"
    elif name.startswith("/"):
        bad = "an absolute path"
    elif re.match(r"^[A-Za-z]:", name):
        bad = "a drive letter"
    parts = tuple(name.rstrip("/").split("/"))
    if bad is None and any(part in ("", ".", "..") for part in parts):
        bad = "a '.', '..' or empty path component"
    if bad:
        raise UserError(f"{zip_path.name}: refusing entry {name!r}: {bad} could write outside the target folder")
    return parts


def _entry_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if info.is_dir():
        return "dir"
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        return "a special file"
    return "file"


def _checked_entries(archive: zipfile.ZipFile, zip_path: Path) -> dict:
    """Bundle-relative name -> ZipInfo of every file; raises on unsafe, linked or duplicate entries."""
    infos = archive.infolist()
    for info in infos:
        safe_parts(info.filename, zip_path)
        kind = _entry_kind(info)
        if kind not in ("file", "dir"):
            raise UserError(f"{zip_path.name}: refusing entry {info.filename!r}: {kind}; bundles hold plain files only")
        if info.flag_bits & 0x1:
            raise UserError(f"{zip_path.name}: entry {info.filename!r} is encrypted; bundles are not")
    files = [info for info in infos if not info.is_dir()]
    top = _top_folder([info.filename for info in files], zip_path)
    entries = {}
    for info in files:
        rel = info.filename[len(top):]
        if rel in entries:
            raise UserError(f"{zip_path.name}: entry {info.filename!r} appears twice")
        entries[rel] = info
    return entries


def _top_folder(names: list, zip_path: Path) -> str:
    """'' for a bundle at the archive's root, 'folder/' when everything sits in one folder (make_zip's layout)."""
    if MANIFEST in names:
        return ""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
        return next(iter(tops)) + "/"
    raise UserError(f"{zip_path.name} is not a python_coreml_sd bundle (no {MANIFEST}); "
                    "make bundles with torch2coreml --bundle-packages --zip")


def _read_manifest(archive: zipfile.ZipFile, entries: dict, zip_path: Path) -> dict:
    info = entries[MANIFEST]
    if info.file_size > 64 << 20:
        raise UserError(f"{zip_path.name}: {MANIFEST} is implausibly large ({info.file_size} bytes)")
    try:
        manifest = json.loads(archive.read(info))
        files = manifest["files"]
        ok = manifest.get("format") == FORMAT and all(
            isinstance(v["size"], int) and v["size"] >= 0 and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])
            for v in files.values())
    except (ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        raise UserError(f"{zip_path.name}: {MANIFEST} is not a valid bundle manifest ({type(exc).__name__})") from exc
    if not ok:
        raise UserError(f"{zip_path.name}: {MANIFEST} is not a {FORMAT} manifest")
    manifest["total_size"] = sum(v["size"] for v in files.values())
    return manifest


def _check_listing(entries: dict, manifest: dict, zip_path: Path) -> None:
    listed = manifest["files"]
    for rel in listed:
        safe_parts(rel, zip_path)
    unlisted = sorted(set(entries) - set(listed) - {MANIFEST})
    missing = sorted(set(listed) - set(entries))
    if unlisted:
        raise UserError(f"{zip_path.name}: {unlisted[0]} is not listed in {MANIFEST}; the archive was altered")
    if missing:
        raise UserError(f"{zip_path.name}: {missing[0]} is listed in {MANIFEST} but missing from the archive")
    for rel, expected in listed.items():
        if entries[rel].file_size != expected["size"]:
            raise UserError(f"{zip_path.name}: {rel} is {entries[rel].file_size} bytes but {MANIFEST} says "
                            f"{expected['size']}; the archive is corrupt or was altered")


def _check_caps(entries: dict, zip_path: Path) -> None:
    """Refuse archives that would inflate beyond the caps. The sizes are the directory's, which
    _check_listing matched with the manifest and _extract_file enforces while writing."""
    remake = "make bundles with torch2coreml --bundle-packages --zip"
    total = sum(info.file_size for info in entries.values())
    if total > MAX_EXTRACTED_BYTES:
        raise UserError(f"{zip_path.name} would extract to {total / 1e9:.1f} GB, over the {MAX_EXTRACTED_BYTES / 1e9:.1f} "
                        f"GB a bundle may take (bundle.MAX_EXTRACTED_BYTES); refusing it as a zip bomb ({remake})")
    for rel, info in sorted(entries.items()):
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_EXEMPT_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise UserError(f"{zip_path.name}: {rel} inflates {ratio:.0f}x ({info.compress_size} to {info.file_size} "
                            f"bytes), over the {MAX_COMPRESSION_RATIO}x a bundle entry may; refusing it as a zip bomb "
                            f"({remake})")


def _check_free_space(folder: Path, needed: int, zip_path: Path) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"extracting {zip_path.name} needs {needed / 1e9:.1f} GB; "
                        f"{folder} has {free / 1e9:.1f} GB free")


def _extract_all(archive, entries: dict, manifest: dict, root: Path, zip_path: Path) -> None:
    root.mkdir()
    for rel, info in sorted(entries.items()):
        target = root.joinpath(*safe_parts(rel, zip_path))
        expected = manifest["files"].get(rel) or {"size": info.file_size, "sha256": None}
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract_file(archive, info, target, expected, rel, zip_path)
        except OSError as exc:  # e.g. "a" and "a/b", or names that collide on a case-insensitive disk
            raise UserError(f"{zip_path.name}: cannot write {rel} ({exc.strerror or exc})") from exc
    _check_packages(root, zip_path)


def _extract_file(archive, info, target: Path, expected: dict, rel: str, zip_path: Path) -> None:
    digest, written = hashlib.sha256(), 0
    try:
        with archive.open(info) as src, open(target, "xb") as dst:
            for block in iter(lambda: src.read(CHUNK), b""):
                written += len(block)
                if written > expected["size"]:  # never trust the header alone: stop at the listed size
                    break
                digest.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise UserError(f"{zip_path.name}: {rel} cannot be read ({exc}); the archive is corrupt") from exc
    os.chmod(target, FILE_MODE)
    if written != expected["size"]:
        raise UserError(f"{zip_path.name}: {rel} holds more or fewer bytes than the {expected['size']} "
                        f"{MANIFEST} lists; the archive is corrupt or was altered")
    if expected["sha256"] and digest.hexdigest() != expected["sha256"]:
        raise UserError(f"{zip_path.name}: {rel} fails its sha256 check (got {digest.hexdigest()[:16]}..., "
                        f"{MANIFEST} says {expected['sha256'][:16]}...); the archive is corrupt or was altered")


def models_folder(path) -> Path:
    """What `-i` names, as a folder of models: folders as they are, a .zip bundle extracted (once, checked)
    into the cache under its sha256, so a second run starts at once and an altered archive never reuses
    an old extraction."""
    path = Path(path)
    if path.suffix.lower() != ".zip":
        return path
    if not path.is_file():
        raise UserError(f"bundle {path} does not exist; pass -i with a models folder, a Resources folder or a .zip")
    from ..model_cache import cache_root
    dest = cache_root() / "bundles" / f"{path.stem}-{sha256_file(path)[:16]}"
    if dest.is_dir():
        return dest
    try:
        return extract_bundle(path, dest)
    except UserError:
        if dest.is_dir():  # another process extracted the same archive first
            return dest
        raise
