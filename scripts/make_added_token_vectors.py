"""Golden token ids for prompts using textual-inversion tokens (added tokens), from Hugging Face's
CLIPTokenizer after diffusers' load_textual_inversion on the embedded tiny model's tokenizer.

    python scripts/make_added_token_vectors.py   # rewrites swift/Tests/StableDiffusionTests/Resources/added_tokens_golden.json

The Swift tokenizer (TokenizerTests) and the Python pipeline's bundled tokenizer (tests/test_textual_inversion.py)
must give the same ids.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "added_tokens_golden.json"
MAX_LENGTH = 77
# token -> number of vectors (a multi-vector embedding adds TOKEN, TOKEN_1, ...)
EMBEDDINGS = {"<cat-toy>": 1, "<Big-Dog>": 2, "sks": 1, "<cat-toy-xl>": 1}
PROMPTS = [
    "a photo of <cat-toy>", "A PHOTO OF <CAT-TOY>", "a<cat-toy>b", "<cat-toy><cat-toy>", "<cat-toy-xl> vs <cat-toy>",
    "<Big-Dog> and <big-dog> and <big-dog>_1", "<big-dog> <big-dog>_1 on a beach", "sks dog, asksb", "sks",
    "a  <cat-toy>\t\n  ,<cat-toy>!", "<|startoftext|><cat-toy><|endoftext|>", "<cat-toy-x", "cat-toy", "<cat toy>",
    "Ｃafé <cat-toy> naïve", "<cat-toy>" * 40,
]


def tokenizer_with_embeddings():
    import torch
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel

    from python_coreml_sd import registry
    from python_coreml_sd.random_models import load_clip_tokenizer

    arch = registry.family("tiny")["architecture"]
    tokenizer = load_clip_tokenizer(arch["tokenizer"]["pad_token"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    host = type("Host", (TextualInversionLoaderMixin,), {"hf_device_map": None, "components": {}})()
    generator = torch.Generator().manual_seed(0)
    for token, vectors in EMBEDDINGS.items():
        host.load_textual_inversion(torch.randn(vectors, arch["text_encoder"]["hidden_size"], generator=generator),
                                    token=token, tokenizer=tokenizer, text_encoder=text_encoder)
    return tokenizer


def build() -> dict:
    from python_coreml_sd.tokenizer_files import added_tokens
    tokenizer = tokenizer_with_embeddings()
    cases = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        cases.append({"prompt": prompt, "ids": ids[:ids.index(49407) + 1]})
    return {"max_length": MAX_LENGTH, "added_tokens": added_tokens(tokenizer), "cases": cases}


def dumps(value) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    GOLDEN.write_text(dumps(build()), encoding="utf-8")
    print(f"wrote {GOLDEN}")
