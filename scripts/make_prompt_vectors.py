"""Golden prompt weights and windows, from the Python side (python_coreml_sd/generation/prompts.py on the
project's CLIP tokenizer, models/tokenizer):

    python scripts/make_prompt_vectors.py   # rewrites swift/Tests/StableDiffusionTests/Resources/prompt_weights_golden.json

The Swift package's PromptWeighting (PromptWeightingTests) must give the same fragments, weights and ids.
"""
import json
import sys
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


def build() -> dict:
    from transformers import CLIPTokenizer

    from python_coreml_sd.generation.prompts import chunk_prompt, parse_weights
    folder = ROOT / "models" / "tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    cases = []
    for prompt in PROMPTS:
        chunks = chunk_prompt(tokenizer, prompt)
        # Weights as repr strings: exact round trips (Foundation's JSON parser can be an ulp off).
        cases.append({"prompt": prompt, "fragments": [[text, repr(weight)] for text, weight in parse_weights(prompt)],
                      "ids": chunks.ids.tolist(), "weights": chunks.weights.tolist()})
    return {"window": 77, "cases": cases}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
