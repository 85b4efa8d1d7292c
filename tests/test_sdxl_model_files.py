"""SDXL (issue 17): --lora merged into the UNet and both text encoders, --textual-inversion embeddings in
SDXL's format (clip_l, clip_g) in both encoders and tokenizers, on `tiny-xl`; LoRAs and embeddings of the
other family are one line, exit 2, nothing written."""
import json

import pytest
import torch

from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.convert.options import EmbeddingSpec, LoraSpec
from python_coreml_sd.model_sources import resolve
from tests import lora_fixtures
from tests.support import assert_one_line

SCALE = 0.7
TOKEN = "<xl-cat>"


@pytest.fixture(scope="module")
def xl():
    return resolve("tiny-xl")


@pytest.fixture(scope="module")
def xl_pairs(xl):
    return lora_fixtures.lora_pairs(xl)


@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_lora_merges_into_the_unet_and_both_text_encoders(tmp_path, xl, xl_pairs, kind):
    from python_coreml_sd.model_edits import source_for
    path = tmp_path / f"xl_{kind}.safetensors"
    getattr(lora_fixtures, f"write_{kind}_lora")(xl_pairs, path)
    assert set(xl_pairs) == {"unet", "text_encoder", "text_encoder_2"}
    merged = source_for(ConversionOptions("tiny-xl", "unused", loras=(LoraSpec(path, SCALE),)))
    for component, modules in xl_pairs.items():
        before = getattr(xl, f"load_{component}")().state_dict()
        after = getattr(merged, f"load_{component}")().state_dict()
        assert set(before) == set(after), component
        expected = {f"{name}.weight": before[f"{name}.weight"] + SCALE * up @ down
                    for name, (down, up) in modules.items()}
        assert modules and len(expected) == len(modules)
        for key, value in before.items():
            want = expected.get(key, value)
            assert torch.allclose(after[key], want, atol=1e-5, rtol=1e-5), (component, key)
            assert (key in expected) != torch.equal(after[key], value), (component, key)


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    path = tmp_path_factory.mktemp("xl_embeddings") / "xl-cat.safetensors"
    lora_fixtures.write_xl_embedding(path, vectors=2)
    return path


def test_embedding_goes_into_both_encoders_and_tokenizers(tmp_path, embedding):
    from safetensors.torch import load_file

    from python_coreml_sd.bundle.resources import write_model_files
    from python_coreml_sd.model_edits import source_for
    options = ConversionOptions("tiny-xl", tmp_path, textual_inversions=(EmbeddingSpec(embedding, TOKEN),))
    source = source_for(options)
    vectors = load_file(str(embedding))
    tokens = [TOKEN, f"{TOKEN}_1"]
    ids = source.load_tokenizer().convert_tokens_to_ids(tokens)
    assert ids == source.load_tokenizer_2().convert_tokens_to_ids(tokens) == [49408, 49409]
    prompt = f"a photo of {TOKEN} {TOKEN}_1"
    assert source.load_tokenizer()(prompt).input_ids == source.load_tokenizer_2()(prompt).input_ids
    for encoder, part in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        table = getattr(source, f"load_{encoder}")().get_input_embeddings().weight
        assert torch.equal(table[ids], vectors[part]), encoder
        assert table.shape[0] == 49410, encoder
    write_model_files(options, tmp_path)
    assert json.loads((tmp_path / "added_tokens.json").read_text(encoding="utf-8")) == dict(zip(tokens, ids))


def test_the_pipelines_second_tokenizer_takes_the_bundles_tokens(tmp_path, xl):
    """A bundle's added_tokens.json reaches tokenizer_2 too, not only the bundled first tokenizer."""
    from python_coreml_sd.generation.setup import second_tokenizer
    prompt = f"a photo of {TOKEN}"
    assert 49408 not in second_tokenizer(xl, tmp_path)(prompt).input_ids  # no added_tokens.json: plain BPE
    (tmp_path / "added_tokens.json").write_text(json.dumps({TOKEN: 49408}), encoding="utf-8")
    assert second_tokenizer(xl, tmp_path)(prompt).input_ids[4] == 49408
    assert second_tokenizer(resolve("tiny"), tmp_path) is None


def _cli(capsys, *argv):
    from python_coreml_sd import torch2coreml
    capsys.readouterr()  # what building the fixtures printed (transformers' loading bars) is not the CLI's
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def _refused(tmp_path, capsys, model, flag, path, *fragments):
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-unet", "--convert-text-encoder", "--model-version", model, flag, str(path),
                     "-o", str(out))
    assert_one_line(code, err, str(path), *fragments, prog="torch2coreml")
    assert not out.exists()


def test_sd_lora_on_sdxl_is_refused(tmp_path, capsys, tiny_source):
    path = tmp_path / "sd_lora.safetensors"
    lora_fixtures.write_kohya_lora(lora_fixtures.lora_pairs(tiny_source), path)
    _refused(tmp_path, capsys, "tiny-xl", "--lora", path, "does not fit the unet")


def test_sdxl_lora_on_sd_is_refused(tmp_path, capsys, xl_pairs):
    path = tmp_path / "xl_lora.safetensors"
    lora_fixtures.write_kohya_lora(xl_pairs, path)
    _refused(tmp_path, capsys, "tiny", "--lora", path, "is for SDXL", "SD 1.x / 2.x")


def test_sd_embedding_on_sdxl_is_refused(tmp_path, capsys):
    path = tmp_path / "sd.safetensors"
    lora_fixtures.write_embedding(path, 768, token="<sd>")
    _refused(tmp_path, capsys, "tiny-xl", "--textual-inversion", path, "width 768", "clip_l and clip_g")


def test_sdxl_embedding_on_sd_is_refused(tmp_path, capsys, embedding):
    _refused(tmp_path, capsys, "tiny", "--textual-inversion", embedding, "is an SDXL embedding")


@pytest.fixture(scope="module")
def xl_lora(tmp_path_factory, xl_pairs):
    """xl_pairs at 0.3x per factor: a LoRA that changes weights by a fraction of their size, as trained ones do.
    At full size the pairs outweigh tiny-xl's own attention weights several times over, and the saturated
    fp16 attention logits then cost the fp16 package about 25 dB against fp32 that no real model would show."""
    path = tmp_path_factory.mktemp("xl_lora") / "xl_style_peft.safetensors"
    small = {c: {n: (0.3 * down, 0.3 * up) for n, (down, up) in modules.items()} for c, modules in xl_pairs.items()}
    lora_fixtures.write_peft_lora(small, path)
    return path


def _mil(package, inputs):
    import numpy as np
    from python_coreml_sd.runtime import load_model
    return load_model(package, backend="mil").predict({k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()})


def test_converted_sdxl_with_lora_agrees_with_diffusers_fused_lora(tmp_path, xl, xl_lora):
    """End to end: tiny-xl converted (fp16) with --lora and run by the MIL runtime against diffusers'
    StableDiffusionXLPipeline with the same LoRA loaded and fused (fp32), for the UNet and text_encoder_2;
    the same packages without the LoRA do not agree."""
    from diffusers import StableDiffusionXLPipeline

    from python_coreml_sd.components import component_of
    from python_coreml_sd.convert import convert
    from python_coreml_sd.convert import text_encoder as te
    from python_coreml_sd.convert import unet as un
    from python_coreml_sd.metrics import psnr
    pipe = StableDiffusionXLPipeline.from_pretrained(str(xl.root))
    pipe.load_lora_weights(str(xl_lora))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()
    packaged = {}
    for name, loras in (("merged", (LoraSpec(xl_lora, SCALE),)), ("plain", ())):
        options = ConversionOptions("tiny-xl", tmp_path / name, loras=loras)
        packaged[name] = {component_of(p): p for p in convert(options, ["text_encoder_2", "unet"])}
    inputs = un.sample_inputs(dict(xl.config("unet")), 2, 16, 16, 77, un.text_pooled_width(xl))
    reference = un.diffusers_reference(pipe.unet, inputs)
    merged, plain = (_mil(packaged[n]["unet"], inputs)["noise_pred"] for n in ("merged", "plain"))
    assert psnr(reference, merged) >= 40 > psnr(reference, plain), (psnr(reference, merged), psnr(reference, plain))

    ids = te.sample_inputs(pipe.text_encoder_2, 77)
    with torch.no_grad():
        expected = pipe.text_encoder_2(ids["input_ids"].to(torch.int64), output_hidden_states=True).hidden_states[-2]
    merged, plain = (_mil(packaged[n]["text_encoder_2"], ids)["hidden_embeds"] for n in ("merged", "plain"))
    assert psnr(expected.numpy(), merged) >= 40 > psnr(expected.numpy(), plain), (psnr(expected.numpy(), merged),
                                                                                  psnr(expected.numpy(), plain))


def test_converted_encoders_with_embedding_read_the_new_tokens(tmp_path, embedding):
    """End to end: both encoders converted (fp16) with --textual-inversion, run by the MIL runtime on a prompt
    with the new tokens, give the PyTorch encoders' (which hold the embedding) penultimate states."""
    from python_coreml_sd.components import component_of
    from python_coreml_sd.convert import convert
    from python_coreml_sd.metrics import psnr
    from python_coreml_sd.model_edits import source_for
    options = ConversionOptions("tiny-xl", tmp_path, textual_inversions=(EmbeddingSpec(embedding, TOKEN),))
    packages = {component_of(p): p for p in convert(options, ["text_encoder", "text_encoder_2"])}
    source = source_for(options)
    ids = source.load_tokenizer()(f"a photo of {TOKEN} {TOKEN}_1", padding="max_length", max_length=77).input_ids
    assert 49408 in ids and 49409 in ids
    tokens = torch.tensor([ids])
    for encoder in ("text_encoder", "text_encoder_2"):
        with torch.no_grad():
            expected = getattr(source, f"load_{encoder}")()(tokens, output_hidden_states=True).hidden_states[-2]
        out = _mil(packages[encoder], {"input_ids": tokens.numpy()})["hidden_embeds"]
        assert psnr(expected.numpy(), out) >= 40, encoder
