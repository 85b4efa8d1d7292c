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
