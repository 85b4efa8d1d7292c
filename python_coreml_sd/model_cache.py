"""Model folders derived from user files (a single-file checkpoint, LoRA merges, embeddings, another VAE),
built once into the cache under a name that hashes everything they were made from, atomically."""
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from ._version import __version__


def sha256_file(path: Path) -> str:
    """sha256 of a file, computed once per process for a given path, size and modification time."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 2**24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("PYTHON_COREML_SD_CACHE", Path.home() / ".cache" / "python_coreml_sd"))


def cached_folder(kind: str, spec: dict, build, marker: str = "model_index.json") -> Path:
    """The folder `cache/<kind>-<hash of spec and converter version>`, built once (see `build_once`)."""
    text = json.dumps({"spec": spec, "version": __version__}, sort_keys=True, default=str)
    dest = cache_root() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def build_with_record(tmp: Path) -> None:
        build(tmp)
        (tmp / "source.json").write_text(text, encoding="utf-8")

    return build_once(dest, build_with_record, marker)


def build_once(dest: Path, build, marker: str = "model_index.json") -> Path:
    """`dest`, a diffusers folder: reused when complete (it has `marker`: a pipeline's model_index.json, a single
    model's config.json), else `build(tmp)` fills a temp folder beside it, which is then renamed into place (a
    failed or interrupted build leaves nothing; a concurrent one wins)."""
    if (dest / marker).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep theirs
            if not (dest / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def link_component(src: Path, dest: Path) -> None:
    """A component folder reused unchanged: its files hard-linked where the file system allows, else copied."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if item.is_dir():
            link_component(item, dest / item.name)
            continue
        try:
            os.link(item.resolve(), dest / item.name)
        except OSError:
            shutil.copy2(item, dest / item.name)


def folder_fingerprint(root: Path) -> list:
    """What identifies a model folder's contents cheaply: every file's relative path, size and mtime."""
    root = Path(root)
    return [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()]
