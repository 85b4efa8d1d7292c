"""--textual-inversion: embeddings (built here for `tiny`) go into the text encoder, their tokens into the
tokenizer and the bundle's added_tokens.json; Python, Swift (golden file) and transformers agree on ids."""
import json

import numpy as np
import pytest
import torch

from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.convert.options import EmbeddingSpec
from python_coreml_sd.metrics import psnr
from tests import lora_fixtures, support
from tests.support import assert_one_line

GOLDEN = support.ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "added_tokens_golden.json"
PROMPTS = ["a photo of <cat-toy>", "A <CAT-TOY> and <Big-Dog>", "<big-dog> <big-dog>_1 on a beach", "a<cat-toy>b",
           "no new token here"]


def test_committed_golden_ids_match_transformers():
    script = support.load_script("make_added_token_vectors")
    assert script.dumps(script.build()) == GOLDEN.read_text(encoding="utf-8"), \
        "added_tokens_golden.json drifted; run `python scripts/make_added_token_vectors.py` and the Swift tests"


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    files = {"cat": folder / "cat.safetensors", "dog": folder / "Big-Dog.safetensors"}
    lora_fixtures.write_embedding(files["cat"], 32, token="<cat-toy>")  # diffusers' format: names its token
    lora_fixtures.write_embedding(files["dog"], 32, vectors=2, seed=1, a1111=True)  # A1111's: no token inside
    return files


@pytest.fixture(scope="module")
def specs(embedding_files):
    return (EmbeddingSpec(embedding_files["cat"]), EmbeddingSpec.parse(f"{embedding_files['dog']}:<Big-Dog>"))


@pytest.fixture(scope="module")
def reference(tiny_source, embedding_files):
    """diffusers' pipeline with the same embeddings loaded."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_source.root), safety_checker=None)
    pipe.load_textual_inversion(str(embedding_files["cat"]))
    pipe.load_textual_inversion(load_file(str(embedding_files["dog"]))["emb_params"], token="<Big-Dog>")
    return pipe


def test_text_encoder_package_uses_the_embeddings(tmp_path, specs, reference, tiny_fp16_packages):
    from python_coreml_sd.runtime import load_model
    options = ConversionOptions("tiny", tmp_path, textual_inversions=specs)
    (package,) = convert(options, ["text_encoder"])
    ids = reference.tokenizer(PROMPTS[1], padding="max_length", max_length=77).input_ids
    assert 49408 in ids and 49409 in ids
    inputs = {"input_ids": np.asarray([ids], dtype=np.float32)}
    with torch.no_grad():
        expected = reference.text_encoder(torch.tensor([ids])).last_hidden_state.numpy()
    actual = load_model(package, backend="mil").predict(inputs)["last_hidden_state"]
    assert psnr(expected, actual) >= 40, psnr(expected, actual)
    import coremltools as ct
    meta = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
    assert [r["file"] for r in json.loads(meta["com.python_coreml_sd.textual_inversions"])] == [
        "cat.safetensors", "Big-Dog.safetensors"]


def test_bundled_tokenizer_gives_transformers_ids(tmp_path, specs, reference):
    from python_coreml_sd.bundle.resources import write_model_files
    from python_coreml_sd.generation.setup import bundled_tokenizer
    options = ConversionOptions("tiny", tmp_path, textual_inversions=specs)
    write_model_files(options, tmp_path)
    added = json.loads((tmp_path / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == {"<cat-toy>": 49408, "<Big-Dog>": 49409, "<Big-Dog>_1": 49410}
    ours = bundled_tokenizer(tmp_path)
    for prompt in PROMPTS:
        assert ours(prompt, padding="max_length", max_length=77).input_ids == \
            reference.tokenizer(prompt, padding="max_length", max_length=77).input_ids, prompt


def _cli(capsys, *argv):
    from python_coreml_sd import torch2coreml
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_embedding_width_mismatch_is_refused(tmp_path, capsys):
    path = tmp_path / "wide.safetensors"
    lora_fixtures.write_embedding(path, 768, token="<wide>")
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-text-encoder", "--textual-inversion", str(path), "-o", str(out))
    assert_one_line(code, err, "width 768", "32 wide", prog="torch2coreml")
    assert not out.exists()


def test_token_already_in_vocabulary_is_refused(tmp_path, capsys):
    path = tmp_path / "cat.safetensors"
    lora_fixtures.write_embedding(path, 32, token="cat")
    code, err = _cli(capsys, "--convert-text-encoder", "--textual-inversion", str(path), "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "already in tokenizer vocabulary", prog="torch2coreml")


def test_pickled_embedding_needs_allow_pickle(tmp_path, capsys):
    path = tmp_path / "emb.pt"
    torch.save({"<x>": torch.zeros(32)}, path)
    code, err = _cli(capsys, "--convert-text-encoder", "--textual-inversion", str(path), "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--allow-pickle", prog="torch2coreml")
