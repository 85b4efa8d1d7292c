"""Prompt weighting and long prompts (generation/prompts.py): A1111's syntax and emphasis, windows of 75 tokens."""
import numpy as np
import pytest
import torch

from python_coreml_sd.generation.prompts import chunk_prompt, parse_weights, weighted
from python_coreml_sd.model_sources import resolve


@pytest.mark.parametrize("text, expected", [  # the examples A1111 documents for its parser
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("[faded:2]", [("faded:2", 1 / 1.1)]),  # a number weighs round brackets only
    ("time: noon", [("time: noon", 1.0)]),
])
def test_parse_weights(text, expected):
    parsed = parse_weights(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert np.allclose([w for _, w in parsed], [w for _, w in expected], rtol=1e-12)


@pytest.fixture(scope="module")
def tiny():
    source = resolve("tiny")
    return source.load_tokenizer(), source.load_text_encoder().eval()


def test_short_unweighted_prompt_is_the_tokenizers_window(tiny):
    tokenizer, _ = tiny
    chunks = chunk_prompt(tokenizer, "a photo of an astronaut riding a horse")
    expected = tokenizer("a photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert chunks.count == 1 and chunks.ids[0].tolist() == expected and np.all(chunks.weights == 1)


def test_long_prompt_splits_into_windows_of_75_tokens(tiny):
    tokenizer, _ = tiny
    text = " ".join(f"word{i}" for i in range(120))
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    chunks = chunk_prompt(tokenizer, text, min_chunks=1)
    assert chunks.count == -(-len(tokens) // 75) >= 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert np.all(chunks.ids[:, 0] == bos)
    assert chunks.ids[:, 1:76].reshape(-1)[:len(tokens)].tolist() == tokens
    assert chunks.ids[0, 76] == eos and chunks.ids.shape == (chunks.count, 77)
    assert chunk_prompt(tokenizer, "short", min_chunks=3).count == 3  # a negative prompt padded to the positive


def test_weights_follow_their_tokens(tiny):
    tokenizer, _ = tiny
    chunks = chunk_prompt(tokenizer, "a (red:1.5) fox [running]")
    words = [tokenizer(w, add_special_tokens=False).input_ids for w in ("a ", "red", " fox ", "running")]
    expected = [1.0] + [1.0] * len(words[0]) + [1.5] * len(words[1]) + [1.0] * len(words[2]) \
        + [1 / 1.1] * len(words[3]) + [1.0]
    assert np.allclose(chunks.weights[0, :len(expected)], expected) and np.all(chunks.weights[0, len(expected):] == 1)


def test_weighted_embeddings_keep_the_mean_and_scale_the_token(tiny):
    tokenizer, text_encoder = tiny
    chunks = chunk_prompt(tokenizer, "a (red:1.5) fox")
    with torch.no_grad():
        hidden = text_encoder(torch.from_numpy(chunks.ids)).last_hidden_state.numpy()
    out = weighted(hidden, chunks.weights[0])
    assert np.isclose(out.mean(), hidden.mean(), rtol=1e-4)
    ratio = out[0] / hidden[0]  # each token scaled by its weight times one common factor
    factor = ratio[0, 0]
    assert np.allclose(ratio, chunks.weights[0][:, None] * factor, rtol=1e-3, atol=1e-3)
    assert np.array_equal(weighted(hidden, np.ones(77, np.float32)), hidden)


def test_pipeline_applies_weights_and_keeps_unweighted_prompts(tiny_models_dir):
    from python_coreml_sd.generation.setup import open_pipeline
    pipe = open_pipeline("torch", tiny_models_dir, "tiny", progress=False)
    plain, emphasised = pipe.encode_text("a red fox"), pipe.encode_text("a (red:1.5) fox")
    assert plain.shape == emphasised.shape == (1, 32, 1, 77)
    assert not np.allclose(plain, emphasised, atol=1e-3)
    assert np.allclose(pipe.encode_text("a (red:1.0) fox"), plain, atol=1e-6)  # weight 1: the same embeddings


def test_swift_golden_file_is_what_python_computes():
    """The fragments, weights and windows the Swift tests check (PromptWeightingTests) are this code's."""
    import json

    from tests import support
    script = support.load_script("make_prompt_vectors")
    committed = json.loads(script.GOLDEN.read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(script.build())), \
        "prompt_weights_golden.json drifted; run `python scripts/make_prompt_vectors.py` and the Swift tests"
