"""Bundles for apps (issue 7): `Resources/` folders laid out as Apple's Swift pipeline loads them,
reproducible zip archives of those folders, and safe extraction of such archives.

    bundle_packages(options, written_paths, dest)   # .mlpackage files under Apple's names (any OS)
    bundle_compiled(options, written_paths, dest)   # .mlmodelc via xcrun coremlcompiler (macOS)
    make_zip(resources_dir, dest_zip, manifest_fields)
    extract_bundle(zip_path, dest)
"""
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ._version import __version__
from .package_io import replace_atomically
from .errors import UserError
from .components import TABLE, TOKENIZER_FILES, component_of

BASE_NAMES = {name: spec.resource for name, spec in TABLE.items()}
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_CONFIG = "pipeline_config.json"
DEFAULT_VAE_SCALING_FACTOR = 0.18215  # SD 1.x and 2.x; what Swift assumes without pipeline_config.json
MANIFEST = "manifest.json"
FORMAT = "python_coreml_sd.bundle/1"
KINDS = ("packages", "compiled")
# Zip's epoch: entries carry no build time, so the same files always give the same bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
# Options that do not change the models: leaving them out keeps the manifest (and sha256) stable.
NOT_MODEL_FLAGS = {"output_dir", "overwrite", "check_output_correctness", "psnr_threshold"}
CHUNK = 1 << 20
# Zip-bomb caps, checked from the archive's directory before anything is written. The largest real
# bundle, SDXL with both text encoders, is about 7 GB; make_zip stores entries (ratio 1), and deflate
# cannot pass about 1030x, so a higher ratio is crafted. Small files may compress well and cannot be bombs.
MAX_EXTRACTED_BYTES = 32 << 30
MAX_COMPRESSION_RATIO = 100
RATIO_EXEMPT_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------- Resources/

def resource_entries(written_paths) -> dict:
    """Apple base name -> converted package, for the packages a conversion wrote."""
    by_component = {}
    for path in map(Path, written_paths):
        component = component_of(path)
        if component is None:
            raise UserError(f"{path} is not a converted Stable Diffusion component; cannot bundle it")
        by_component[component] = path
    if "unet_chunk1" in by_component and "unet_chunk2" in by_component:
        by_component.pop("unet", None)  # apps load the chunks; the whole UNet would double the download
    if not by_component:
        raise UserError("nothing to bundle: no converted packages")
    return {BASE_NAMES[c]: p for c, p in sorted(by_component.items())}


def write_tokenizer(model_version: str, dest: Path, source=None) -> None:
    from .model_sources import resolve
    from .tokenizer_files import write_added_tokens
    tokenizer = (source or resolve(model_version)).load_tokenizer()
    write_added_tokens(tokenizer, dest)  # textual-inversion tokens: added_tokens.json
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # transformers 5 tokenizers are `tokenizers`-backed: their BPE model writes both files
        backend.model.save(str(dest))
    else:
        tokenizer.save_vocabulary(str(dest))
    missing = [name for name in TOKENIZER_FILES if not (dest / name).is_file()]
    if missing:
        raise UserError(f"the tokenizer of {model_version!r} wrote no {', '.join(missing)}; "
                        "the Swift pipeline needs a CLIP BPE tokenizer (vocab.json + merges.txt)")


def write_scheduler_config(model_version: str, dest: Path, source=None) -> None:
    """The model's scheduler/scheduler_config.json, keys sorted, so the Swift package builds its
    scheduler from the model's own betas, prediction type, timestep spacing and steps offset (without
    the file it falls back to SD 1.x's). Models without a scheduler folder get none."""
    from .model_sources import resolve
    source = source or resolve(model_version)
    if not source.has("scheduler"):
        return
    config = source.config("scheduler")
    (dest / SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def pipeline_settings(options) -> dict:
    """What the Swift loop needs from the model besides the Core ML files: the VAE's latent scaling
    factor, the text encoder's sequence length, and the latent and image size the models were made for."""
    from .model_edits import source_for
    source = source_for(options)
    settings = {"vae_scaling_factor": DEFAULT_VAE_SCALING_FACTOR}
    if source.has("vae"):
        settings["vae_scaling_factor"] = float(source.config("vae").get("scaling_factor", DEFAULT_VAE_SCALING_FACTOR))
    if source.has("text_encoder"):
        length = source.config("text_encoder").get("max_position_embeddings")
        if length:
            settings["text_sequence_length"] = int(length)
    sample_size = source.config("unet").get("sample_size") if source.has("unet") else None
    if isinstance(sample_size, int):
        sample_size = [sample_size, sample_size]
    latent = [getattr(options, "latent_h", None), getattr(options, "latent_w", None)]
    if sample_size:
        latent = [value if value is not None else default for value, default in zip(latent, sample_size)]
    if None not in latent:
        settings["latent_size"] = [int(v) for v in latent]
        settings["image_size"] = [8 * int(v) for v in latent]
    return settings


def write_model_files(options, dest: Path) -> None:
    from .model_edits import source_for
    source = source_for(options)  # with its edits: textual-inversion tokens
    write_tokenizer(options.model_version, dest, source)
    write_scheduler_config(options.model_version, dest, source)
    text = json.dumps(pipeline_settings(options), indent=2, sort_keys=True) + "\n"
    (dest / PIPELINE_CONFIG).write_text(text, encoding="utf-8")


def bundle_packages(options, written_paths, dest) -> Path:
    """`dest` (a Resources/ folder): the packages as TextEncoder.mlpackage, Unet.mlpackage, ... plus the
    tokenizer files, scheduler_config.json and pipeline_config.json; written beside `dest` and renamed into place."""
    entries = resource_entries(written_paths)

    def build(tmp: Path):
        tmp.mkdir()
        for name, package in entries.items():
            shutil.copytree(package, tmp / f"{name}.mlpackage")
        write_model_files(options, tmp)

    return replace_atomically(build, Path(dest), options.overwrite)


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
        os.rename(compiled, target)
    return target


def bundle_compiled(options, written_paths, dest) -> Path:
    """`dest` (a Resources/ folder) as Apple's Swift CLI loads it: TextEncoder.mlmodelc, Unet.mlmodelc, ...
    plus the tokenizer files. macOS only."""
    require_compiler()
    entries = resource_entries(written_paths)

    def build(tmp: Path):
        tmp.mkdir()
        for name, package in entries.items():
            print(f"bundle: compiling {package.name} -> {name}.mlmodelc", file=sys.stderr, flush=True)
            compile_package(package, tmp, name)
        write_model_files(options, tmp)

    return replace_atomically(build, Path(dest), options.overwrite)


# ------------------------------------------------------------------------------------------ archives

def is_palettized(options) -> bool:
    return bool(getattr(options, "quantize_nbits", None) or getattr(options, "mixed_bit_recipe", None))


def zip_name(options, kind: str) -> str:
    """Named like the published archives: coreml-<model>[-palettized]_<attention>_<compiled|packages>.zip."""
    path = Path(options.model_version).expanduser()
    model = path.resolve().name if path.exists() else options.model_version.rstrip("/").split("/")[-1]
    palettized = "-palettized" if is_palettized(options) else ""
    return f"coreml-{model}{palettized}_{options.attention_implementation.lower()}_{kind}.zip"


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


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


# ---------------------------------------------------------------------------------------- extraction

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
    from .package_check import check_package
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
    from .random_models import cache_root
    dest = cache_root() / "bundles" / f"{path.stem}-{sha256_file(path)[:16]}"
    if dest.is_dir():
        return dest
    try:
        return extract_bundle(path, dest)
    except UserError:
        if dest.is_dir():  # another process extracted the same archive first
            return dest
        raise


# -------------------------------------------------------------------------------- converter wiring

@dataclasses.dataclass
class BundlePlan:
    """What torch2coreml bundles after converting; made (and checked) before any conversion work."""
    options: object
    kind: str  # "packages" or "compiled"
    resources: Path
    zip_path: Path = None

    def build(self, written_paths) -> list:
        if self.resources.exists() and not self.options.overwrite:  # a rerun after an interrupted bundling
            resources = self._reuse_resources(written_paths)
        else:
            make = bundle_compiled if self.kind == "compiled" else bundle_packages
            resources = make(self.options, written_paths, self.resources)
        print(f"bundle: {resources}", file=sys.stderr, flush=True)
        if self.zip_path is None:
            return [resources]
        fields = manifest_fields(self.options, self.kind, resources)
        archive = make_zip(resources, self.zip_path, fields, overwrite=self.options.overwrite)
        print(f"zip: {archive} (sha256 {sha256_file(archive)})", file=sys.stderr, flush=True)
        return [resources, archive]


    def _reuse_resources(self, written_paths) -> Path:
        """An existing Resources/ is kept when it holds exactly the packages just converted or reused."""
        entries = resource_entries(written_paths)
        same = self.kind == "packages" and all(
            _tree_digest(self.resources / f"{name}.mlpackage") == _tree_digest(package)
            for name, package in entries.items()) and all((self.resources / f).is_file() for f in TOKENIZER_FILES)
        if not same:
            raise UserError(f"{self.resources} exists and does not hold these packages; pass --overwrite to "
                            "replace it or choose another -o")
        return self.resources


def _tree_digest(folder: Path) -> dict:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def plan_bundle(options, compiled: bool, packages: bool, zip_: bool) -> BundlePlan:
    """None when no bundle is asked for; raises UserError for what would fail only after converting."""
    if zip_ and not (compiled or packages):
        raise UserError("--zip archives a bundle: add --bundle-packages (or --bundle-resources-for-swift-cli on macOS)")
    if not (compiled or packages):
        return None
    if compiled:
        require_compiler()
    kind = "compiled" if compiled else "packages"
    plan = BundlePlan(options, kind, Path(options.output_dir) / "Resources",
                      Path(options.output_dir) / zip_name(options, kind) if zip_ else None)
    # An existing Resources/ is checked against the packages after converting (a rerun resumes there).
    if plan.zip_path and plan.zip_path.exists() and not options.overwrite:
        raise UserError(f"{plan.zip_path} exists; pass --overwrite to replace it")
    return plan
