"""Golden prompt weights and windows, from the Python side (python_coreml_sd/generation/prompts.py on the
project's CLIP tokenizer, models/tokenizer):

    python scripts/make_prompt_vectors.py   # rewrites swift/Tests/StableDiffusionTests/Resources/prompt_weights_golden.json

The Swift package's PromptWeighting (PromptWeightingTests) must give the same fragments, weights and ids; its
pipeline (LongPromptTests) the same windows and concatenated embeddings of a long prompt, run through the Python
pipeline with the closed-form text encoder and a UNet taking several windows, and the same sizes and window
counts read from pipeline_config.json files.
"""
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "prompt_weights_golden.json"
PROMPTS = [
    "normal text", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "", "[faded:2]", "time: noon", "(a:1.5:2)",
    "((a) [b]) c", "(red : 0.7 ) fox", "(fox:+1.25)", "(fox:.5)", "(fox:2.)", "x) y] z", "\\\\ backslash \\ q",
    "[[a]] ([b]) (c:-1)", "a (b [c (d:2) e] f) g", "(" * 5 + "deep", "BREAK is a word here",
    "a photo of an astronaut riding a horse on mars, (highly detailed:1.2), [blurry]",
    " ".join(f"(word{i}:1.{i % 10})" if i % 7 == 0 else f"word{i}" for i in range(160)),
]

# 200 one-token words, a few weighted: three windows of 75.
LONG_WORDS = ["a", "photo", "of", "(red:1.3)", "fox", "in", "a", "[dark]", "forest", "((sharp))", "light", "and",
              "(tall:0.8)", "trees", "under", "the", "sky", "with", "[[fog]]", "rain"]
LONG_PROMPT = " ".join(LONG_WORDS[i % len(LONG_WORDS)] for i in range(200))
NEGATIVE_PROMPT = "(ugly:1.2), blurry"
# pipeline_config.json files as the converter writes them (bundle.pipeline_settings), and two hand-made ones.
CONFIG_SHAPES = [((), 1), (((64, 64),), 1), (((64, 64), (64, 96), (96, 64)), 3), (((96, 64), (64, 64)), 2)]


def tokenizer():
    from transformers import CLIPTokenizer
    folder = ROOT / "models" / "tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def closed_form_pipeline(max_chunks: int):
    """The Python pipeline over the closed-form models, its UNet taking contexts of 77 * 1..max_chunks tokens."""
    from python_coreml_sd.components import TABLE
    from python_coreml_sd.generation.pipeline import StableDiffusionPipeline
    from python_coreml_sd.testing.closed_form import SD_SCHEDULER_CONFIG, model_set
    models = model_set()
    unet = models["unet"]
    name = TABLE["unet"].inputs[2]  # encoder_hidden_states (B, C, 1, S)
    batch, channels, _, length = unet.input_shapes[name]
    unet.enumerated[name] = [(batch, channels, 1, length * k) for k in range(1, max_chunks + 1)]
    return StableDiffusionPipeline(models, tokenizer(), SD_SCHEDULER_CONFIG, progress=False)


def long_prompt(max_chunks: int) -> dict:
    """The windows and [negative, conditional] embeddings (2, C, 1, S) the Python pipeline gives LONG_PROMPT."""
    pipe = closed_form_pipeline(max_chunks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, hidden = pipe.encode_prompts(LONG_PROMPT, NEGATIVE_PROMPT)
        chunks = pipe.prompt_chunks(LONG_PROMPT)
    count = hidden.shape[-1] // pipe.sequence_length
    negative = pipe.prompt_chunks(NEGATIVE_PROMPT, count)
    return {"max_prompt_chunks": max_chunks, "ids": chunks.ids.tolist(), "weights": chunks.weights.tolist(),
            "negative_ids": negative.ids.tolist(), "embeddings_shape": list(hidden.shape),
            "embeddings": hidden.reshape(-1).tolist(), "warnings": sorted({str(w.message) for w in caught})}


def pipeline_configs() -> list:
    from python_coreml_sd.bundle.resources import shape_settings, shapes_of
    configs = []
    for sizes, chunks in CONFIG_SHAPES:
        settings = {"text_sequence_length": 77, "vae_scaling_factor": 0.18215, **shape_settings(sizes, chunks)}
        if sizes:
            settings.update(latent_size=list(sizes[0]), image_size=[8 * v for v in sizes[0]])
        configs.append(settings)
    configs.append({"latent_size": [32, 48], "max_prompt_chunks": 4})
    return [{"json": json.dumps(c, sort_keys=True), **shapes_of(c)} for c in configs]


def prompt_tokens(tokenizer, text: str) -> int:
    """How many text tokens the weighted prompt has (brackets and weights are syntax, not tokens)."""
    from python_coreml_sd.generation.prompts import parse_weights
    return sum(len(tokenizer(fragment, add_special_tokens=False).input_ids) for fragment, _ in parse_weights(text))


def build() -> dict:
    tokenizer_ = tokenizer()
    assert prompt_tokens(tokenizer_, LONG_PROMPT) == 200
    long = {"prompt": LONG_PROMPT, "negative_prompt": NEGATIVE_PROMPT, "runs": [long_prompt(4), long_prompt(2)]}
    return {"window": 77, "cases": cases(tokenizer_), "long_prompt": long, "pipeline_configs": pipeline_configs()}


def cases(tokenizer) -> list:
    from python_coreml_sd.generation.prompts import chunk_prompt, parse_weights
    cases = []
    for prompt in PROMPTS:
        chunks = chunk_prompt(tokenizer, prompt)
        # Weights as repr strings: exact round trips (Foundation's JSON parser can be an ulp off).
        cases.append({"prompt": prompt, "fragments": [[text, repr(weight)] for text, weight in parse_weights(prompt)],
                      "ids": chunks.ids.tolist(), "weights": chunks.weights.tolist()})
    return cases


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
