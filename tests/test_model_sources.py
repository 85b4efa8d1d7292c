import json

import pytest

from python_coreml_sd import registry
from python_coreml_sd.errors import UserError
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.random_models import build_components, materialized_model_dir


def test_tiny_is_a_real_diffusers_folder_with_sd1_classes(tiny_source):
    index = tiny_source.index
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"][1] == "UNet2DConditionModel"
    assert index["safety_checker"][1] == "StableDiffusionSafetyChecker"
    unet = tiny_source.config("unet")
    assert unet["down_block_types"][0] == "CrossAttnDownBlock2D" and unet["up_block_types"][0] == "UpBlock2D"
    assert not unet.get("use_linear_projection")


def test_tiny_materialises_deterministically(tmp_path, monkeypatch):
    import torch
    first = build_components("tiny", seed=0)["unet"].state_dict()
    second = build_components("tiny", seed=0)["unet"].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    monkeypatch.setenv("PYTHON_COREML_SD_CACHE", str(tmp_path))
    folder = materialized_model_dir("tiny")
    assert folder.parent == tmp_path and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert materialized_model_dir("tiny") == folder  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_tokenizer_is_the_real_clip_bpe(tiny_source):
    tokenizer = tiny_source.load_tokenizer()
    assert len(tokenizer) == 49408
    ids = tokenizer("a photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    # Token ids of OpenAI's CLIP tokenizer for this prompt.
    assert ids[:9] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558]
    assert ids[9:] == [49407] * 68


def test_sd2_family_inherits_and_overrides():
    v = registry.family("sd2-v")
    assert v["prediction_type"] == "v_prediction"
    assert v["architecture"]["unet"]["sample_size"] == 96
    assert v["architecture"]["unet"]["cross_attention_dim"] == 1024
    assert v["architecture"]["unet"]["use_linear_projection"] is True


def test_sd2_like_folder_loads_through_the_same_path(sd2_source):
    assert sd2_source.load_text_encoder().config.hidden_size == 1024
    assert sd2_source.load_unet().config.use_linear_projection
    assert not sd2_source.has("safety_checker")


@pytest.mark.parametrize("bad, message", [
    ("/no/such/folder", "does not exist"),
    ("not-a-model-name", "neither a folder nor a known name"),
])
def test_bad_model_version_is_a_user_error(bad, message):
    with pytest.raises(UserError, match=message):
        resolve(bad)


def test_folder_without_model_index_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        resolve(str(tmp_path))


def test_unreachable_hub_names_the_cause(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot fetch 'someone/some-model' from the Hugging Face hub"):
        resolve("someone/some-model")


def test_unsupported_component_class_is_a_user_error(tmp_path, tiny_source):
    index = dict(tiny_source.index, unet=["diffusers", "UNet2DModel"])
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="unsupported unet class 'UNet2DModel'"):
        resolve(str(tmp_path)).require("unet")


def test_components_saved_in_fp16_load_in_fp32(tmp_path, tiny_source):
    """Published models often save their text encoder and safety checker in fp16 (config.json says so,
    beside fp16 variant files); transformers 5 would load them as saved. Converters need fp32."""
    import shutil

    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModel

    shutil.copytree(tiny_source.root, tmp_path / "m")
    for folder, cls in (("text_encoder", CLIPTextModel), ("safety_checker", StableDiffusionSafetyChecker)):
        half = cls.from_pretrained(str(tmp_path / "m" / folder), dtype=torch.float16)
        half.save_pretrained(str(tmp_path / "m" / folder), variant="fp16")
        half.save_pretrained(str(tmp_path / "m" / folder))
        assert json.loads((tmp_path / "m" / folder / "config.json").read_text())["dtype"] == "float16"
    source = resolve(str(tmp_path / "m"))
    for module in (source.load_text_encoder(), source.load_safety_checker()):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_missing_component_message_fits_its_context(tmp_path, tiny_source):
    """Conversion names the --convert-* flag to drop; generation, which has no such flag, does not."""
    index = dict(tiny_source.index)
    del index["safety_checker"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    source = resolve(str(tmp_path))
    with pytest.raises(UserError, match="drop --convert-safety-checker or use a model"):
        source.require("safety_checker", "--convert-safety-checker")
    with pytest.raises(UserError, match=r"model_index.json\); use a model that has one"):
        source.require("safety_checker")
