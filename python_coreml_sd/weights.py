"""Reading `.safetensors` weights into memory of their own, with the header checked as untrusted input.

Why not `safetensors.torch.load_file`: it maps the file, and every tensor is a view of that one mapping,
so the mapping (and every page of it that was read) stays resident until the last tensor goes. During
a UNet conversion the fp16 copies then pile up on top of all fp32 pages (+1.1 GiB peak on SD 1.5).
Reading each tensor into its own storage lets the streaming fp16 cast free each fp32 weight as it goes.
"""
import json
import struct
from pathlib import Path

import torch

from .errors import UserError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(path: Path) -> dict:
    """The tensor entries of a safetensors file (name -> dtype, shape, data_offsets), validated against
    the file's size: a header that is truncated, oversized, malformed or points outside the file is a
    UserError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _bad(path, "the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _bad(path, f"its header claims {length} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise _bad(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return {"entries": header, "data_start": 8 + length}


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    try:
        dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        count = 1
        for dim in shape:
            if not isinstance(dim, int) or dim < 0:
                raise ValueError
            count *= dim
        valid = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size
    except (KeyError, TypeError, ValueError):
        raise _bad(path, f"tensor {name!r} has a malformed entry") from None
    if not valid or end - begin != count * torch.tensor([], dtype=dtype).element_size():
        raise _bad(path, f"tensor {name!r} lies outside the file or has the wrong size")


def read_safetensors(path: Path, *, keep=None, convert=None) -> dict:
    """name -> tensor, each read into its own storage (no mapping of the file); with `keep` (a predicate on
    names), only the tensors it accepts are read.

    With `convert` (tensor -> tensor), each tensor is read into one buffer reused for all of them and
    only convert(tensor) is kept (copied out of the buffer if it is a view of it): a caller that turns
    fp32 weights into fp16 this way holds one fp32 tensor at a time, and no fp32 tensor is ever freed.
    Freeing one per weight would leave the C heap holes that the smaller fp16 copies do not fill
    (0.27 GiB on SD 1.5) and that count in the process's peak memory."""
    path = Path(path)
    header = read_header(path)
    entries = header["entries"]
    scratch = torch.empty(max((e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()), default=0),
                          dtype=torch.uint8) if convert else None
    tensors = {}
    with open(path, "rb") as f:
        for name, entry in entries.items():
            if keep is not None and not keep(name):
                continue
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            raw = scratch[:end - begin] if convert else torch.empty(end - begin, dtype=torch.uint8)
            f.seek(header["data_start"] + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise _bad(path, f"tensor {name!r} is truncated")
            tensor = raw.view(dtype).view(entry["shape"])
            if convert:
                tensor = convert(tensor)
                if tensor.untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr():
                    tensor = tensor.clone()
            tensors[name] = tensor
    return tensors


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid safetensors file ({why}); re-download or re-save the weights")


# Pickled checkpoints: loading one runs whatever code it names (torch.load's weights_only mode narrows
# that, and its error message even suggests turning it off), so they are refused, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickles(folder: Path) -> None:
    """A UserError when a component folder holds weights only as pickles, with the command that converts
    them. Pickles beside safetensors are left alone: the loaders are told to read safetensors only."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise UserError(f"{pickles[0]} is a pickled PyTorch checkpoint, which is not loaded (unpickling can run code); "
                        "where you trust it, convert it to safetensors: python -c \"import torch, safetensors.torch as st; "
                        f"st.save_file(torch.load('{pickles[0]}', weights_only=True), '{_safetensors_name(pickles[0])}')\"")


def _safetensors_name(path: Path) -> Path:
    # The names diffusers and transformers look for: diffusion_pytorch_model.safetensors, model.safetensors.
    stem = path.stem if path.stem.startswith("diffusion_pytorch_model") else path.stem.replace("pytorch_model", "model")
    return path.with_name(stem + ".safetensors")
