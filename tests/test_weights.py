"""python_coreml_sd.weights: safetensors read into private memory; hostile headers refused in one line."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from python_coreml_sd.errors import UserError
from python_coreml_sd.model_sources import load_diffusers_model
from python_coreml_sd.weights import read_header, read_safetensors


def test_reads_what_safetensors_wrote_into_private_storage(tmp_path):
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "m": torch.tensor([True, False]),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    storages = {t.untyped_storage().data_ptr() for t in ours.values() if t.numel()}
    assert len(storages) == sum(1 for t in ours.values() if t.numel())  # one storage per tensor, no shared mapping


def test_a_converting_read_keeps_what_convert_made_in_storage_of_its_own(tmp_path):
    """With `convert`, tensors are read through one reused buffer: whatever convert returns, a new
    tensor or its input (a view of that buffer), each result holds its own values after every later read."""
    tensors = {"large": torch.randn(64, 64), "small": torch.randn(5), "h": torch.randn(7).half(),
               "i": torch.arange(6, dtype=torch.int64), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))

    def halve_large(tensor):
        return tensor.half() if tensor.dtype == torch.float32 and tensor.numel() > 100 else tensor

    for convert in (halve_large, lambda tensor: tensor):
        ours = read_safetensors(path, convert=convert)
        assert ours.keys() == tensors.keys()
        for name, value in tensors.items():
            expected = convert(value)
            assert ours[name].dtype == expected.dtype and torch.equal(ours[name], expected), name
        storages = {t.untyped_storage().data_ptr() for t in ours.values() if t.numel()}
        assert len(storages) == sum(1 for t in ours.values() if t.numel())


def test_diffusers_models_load_identically_to_from_pretrained(tiny_source):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    for cls, folder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        ours = load_diffusers_model(cls, tiny_source.root / folder)
        theirs = cls.from_pretrained(str(tiny_source.root / folder))
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), folder
        assert not any(t.is_meta for t in ours.parameters())


@pytest.fixture(scope="module")
def sharded_unet(tiny_source, tmp_path_factory):
    """The tiny UNet saved as save_pretrained shards it (an index and several safetensors files), as
    full-size SDXL UNets are (10 GB over diffusers' default shard size)."""
    from diffusers import UNet2DConditionModel
    folder = tmp_path_factory.mktemp("sharded") / "unet"
    UNet2DConditionModel.from_pretrained(str(tiny_source.root / "unet")).save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 2 and not (folder / "diffusion_pytorch_model.safetensors").exists()
    return folder


def test_sharded_weights_load_identically_and_convert_as_they_are_read(sharded_unet, tiny_source):
    from diffusers import UNet2DConditionModel
    seen = []

    def halve(tensor):
        seen.append(tensor.dtype)
        return tensor.half()

    ours = load_diffusers_model(UNet2DConditionModel, sharded_unet, convert=halve)
    theirs = UNet2DConditionModel.from_pretrained(str(tiny_source.root / "unet"))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and len(seen) == len(b)  # every tensor went through convert, none through diffusers
    assert all(torch.equal(a[k], b[k].half()) for k in a)


@pytest.mark.parametrize("weight_map, message", [
    ({"conv_in.weight": "../unet/x.safetensors"}, "no valid weight_map"),
    ({"conv_in.weight": "/etc/passwd"}, "no valid weight_map"),
    ({}, "no valid weight_map"),
    ({"conv_in.weight": "gone-00009-of-00009.safetensors"}, "1 shard(s) that are missing"),
])
def test_a_bad_shard_index_is_one_line(sharded_unet, tmp_path, weight_map, message):
    import shutil
    from diffusers import UNet2DConditionModel
    folder = shutil.copytree(sharded_unet, tmp_path / "unet")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_diffusers_model(UNet2DConditionModel, folder)


def write_raw(path, header, data=b""):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    (b"", None, "shorter than a safetensors header"),
    (b"{not json", b"", "header is not JSON"),
    ([1, 2], b"", "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234", "lies outside the file"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"12345678", "wrong size"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"12345678", "malformed entry"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"12345678", "malformed entry"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"12345678", "malformed entry"),
])
def test_hostile_headers_are_one_line_errors(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    if data is None:
        path.write_bytes(b"\x01\x02")
    else:
        write_raw(path, header, data)
    with pytest.raises(UserError, match=message) as info:
        read_safetensors(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_header_length_beyond_the_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(UserError, match="header claims"):
        read_header(path)
