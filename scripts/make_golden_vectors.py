"""Write the golden vectors the Swift package's tests compare against (swift/Tests/.../golden.json).

They come from the Python side: Hugging Face's CLIPTokenizer on models/tokenizer, diffusers'
PNDMScheduler and DPMSolverMultistepScheduler with the SD 1.x config, NumPy's legacy RandomState
and PyTorch's CPU generator, and the closed-form generation loop in
python_coreml_sd/testing/closed_form.py. tests/test_golden_vectors.py regenerates them and fails
when the committed file drifts from what Python computes now.

    python scripts/make_golden_vectors.py            # rewrite the committed file
    python scripts/make_golden_vectors.py -o out.json
"""
import argparse
import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from python_coreml_sd.testing import closed_form  # noqa: E402

GOLDEN_PATH = ROOT / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "golden.json"
TOKENIZER_DIR = ROOT / "models" / "tokenizer"
MAX_LENGTH = 77
RANDOM_SEEDS = [0, 1, 42, 31337, 4294967295]
RANDOM_SHAPES = [(1,), (2,), (7,), (15,), (16,), (17,), (2, 3, 5), (1, 4, 8, 8), (1, 4, 64, 64)]
FULL_VALUES_LIMIT = 320  # longer samples keep their ends and a CRC32 of all float32 bytes
SCHEDULER_SHAPE = (1, 4, 2, 4)

BASE_PROMPTS = [
    "", " ", "a", "A", "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT, riding a HORSE!!!", "don't stop, it's what we're", "they'll've I'm you'd",
    "'s 't 're 've 'm 'll 'd", "''''", "'sun", "!'s", "rock'n'roll", "high-quality, 8k, trending on artstation",
    "1234567890", "3.14159 and 2,718", "x=1+2*3/4-5", "email@example.com http://a.b/c?d=e&f=g#h",
    "café naïve résumé", "Über straße", "ΣΑΣ σας", "İstanbul", "日本の桜の木", "中文提示词，很漂亮的风景",
    "한국어 프롬프트", "Привет, мир", "مرحبا بالعالم", "שלום עולם", "हिन्दी", "ภาษาไทย",
    "emoji 🐱‍👤 🎨🖌️ 👍🏽", "tabs\tand\nnewlines\r\nand  spaces", "non\u00a0breaking\u2003space",
    "e\u0301 combining", "ﬁ ligature ２ fullwidth", "<|startoftext|>hi<|endoftext|>", "<|endoftext|>",
    "a <|startoftext|>", "((masterpiece)), [best quality], {detailed}", "~!@#$%^&*()_+`-=[]\\{}|;:\",./<>?",
    "…—–«»“”‘’", "\u200b zero width", "Ⅻ Roman ½ ³", "ⓐⓑⓒ", "𝓯𝓪𝓷𝓬𝔂 letters",
    "a " * 80, "photorealistic " * 30, "supercalifragilisticexpialidocious antidisestablishmentarianism",
]
WORDS = ("a photo of cat dog astronaut castle sunset cyberpunk city neon ultra detailed oil painting by "
         "greg rutkowski 4k hdr bokeh portrait woman man forest river mountain snow fire dragon robot "
         "steampunk watercolor anime studio ghibli unreal engine octane render sharp focus").split()
EXTRAS = [",", ".", "!", "?", "'s", "-", "(", ")", "[", "]", ":", ";", "é", "ü", "日本", "🐱", "42", "3.5", "&", "'"]


def generated_prompts(count: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 90)):
            parts.append(rng.choice(WORDS) if rng.random() < 0.75 else rng.choice(EXTRAS))
        joiners = [" ", "", "  ", ", "]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(joiners) + part
        prompts.append(text.upper() if rng.random() < 0.1 else text)
    return prompts


UNICODE_RANGES = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x530), (0x590, 0x700), (0x900, 0xE00),
                  (0x1100, 0x1200), (0x2000, 0x2070), (0x2150, 0x2190), (0x3000, 0x3100), (0x4E00, 0x4E80),
                  (0xAC00, 0xAC80), (0xFF00, 0xFF70), (0x1D400, 0x1D480), (0x1F300, 0x1F680)]
SPACES = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000", "\u2009", "\u200b", "\u2028",
          "\u2029", "\u202f", "\u205f", "\u3000", "\ufeff", "\x00", "\x7f"]


def fuzz_prompts(count: int, seed: int = 1):
    """Random code points from many scripts, symbols, marks and every kind of space: where a
    hand-written tokenizer tends to disagree with the reference."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.15:
                chars.append(rng.choice(SPACES))
            else:
                low, high = rng.choice(UNICODE_RANGES)
                chars.append(chr(rng.randrange(low, high)))
        prompts.append("".join(chars))
    return prompts


def make_tokenizer():
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))

    def tokenize(text):
        return tokenizer(text, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    return tokenize


def unpadded(ids):
    """Ids up to and including the first end token; the Swift test pads the rest with 49407."""
    return ids[:ids.index(49407) + 1]


def crc32_float32(values: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(values, dtype="<f4").tobytes())


def float_list(values) -> list:
    return [float(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def tokenizer_section(tokenize):
    prompts = BASE_PROMPTS + generated_prompts(260) + fuzz_prompts(120)
    return {"max_length": MAX_LENGTH, "pad_id": 49407, "cases": [tokenizer_case(p, tokenize) for p in prompts]}


def tokenizer_case(prompt: str, tokenize) -> dict:
    case = {"prompt": prompt, "ids": unpadded(tokenize(prompt))}
    if "\ufeff" in prompt:
        # Exact code points too: Foundation's JSON parser on Linux drops a leading U+FEFF from strings.
        case["codepoints"] = [ord(ch) for ch in prompt]
    return case


def random_case(rng: str, seed: int, shape) -> dict:
    values = closed_form.random_normal(rng, seed, shape).reshape(-1)
    case = {"seed": seed, "shape": list(shape), "count": int(values.size), "crc32": crc32_float32(values)}
    if values.size <= FULL_VALUES_LIMIT:
        case["values"] = float_list(values)
    else:
        case["head"], case["tail"] = float_list(values[:64]), float_list(values[-64:])
    return case


def random_section():
    section = {rng: [random_case(rng, seed, shape) for seed in RANDOM_SEEDS for shape in RANDOM_SHAPES]
               for rng in ("numpy", "torch")}
    section["torch_scalar"] = torch_scalar_cases()
    return section


def torch_scalar_cases():
    """torch.randn through its portable (libm) kernel, as Arm builds run it: x86 wheels pick it
    only when ATEN_CPU_CAPABILITY=default is set before torch loads, hence the subprocess."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from scripts.make_golden_vectors import *; "
            "print(json.dumps([random_case('torch', s, sh) for s in RANDOM_SEEDS[:3] for sh in RANDOM_SHAPES]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def scheduler_case(name: str, prediction_type: str, steps: int) -> dict:
    """Step outputs for fixed model outputs; each step starts from the previous golden sample."""
    scheduler = closed_form.make_scheduler(name, prediction_type)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    sample = np.random.RandomState(7).randn(*SCHEDULER_SHAPE).astype(np.float32)
    samples, outputs = [float_list(sample)], []
    for k, t in enumerate(timesteps):
        output = (0.5 * np.random.RandomState(100 + k).randn(*SCHEDULER_SHAPE)).astype(np.float32)
        sample = scheduler.step(torch.from_numpy(output), t, torch.from_numpy(sample)).prev_sample.numpy()
        outputs.append(float_list(output))
        samples.append(float_list(sample))
    case = {"scheduler": name, "prediction_type": prediction_type, "steps": steps,
            "timesteps": timesteps, "model_outputs": outputs, "samples": samples}
    if name == "dpmpp":
        case["sigmas"] = float_list(scheduler.sigmas)
    return case


def replay_scheduler_case(case: dict) -> list:
    """Each step of a committed case run again from the committed sample before it (teacher forcing):
    the scheduler's state then holds committed values only, so another CPU's rounding stays a
    per-step error instead of compounding over the chain. Returns the step outputs as float32 arrays."""
    scheduler = closed_form.make_scheduler(case["scheduler"], case["prediction_type"])
    scheduler.set_timesteps(case["steps"])
    outputs = []
    for k, t in enumerate(case["timesteps"]):
        sample = torch.tensor(case["samples"][k], dtype=torch.float32).reshape(SCHEDULER_SHAPE)
        model_output = torch.tensor(case["model_outputs"][k], dtype=torch.float32).reshape(SCHEDULER_SHAPE)
        outputs.append(scheduler.step(model_output, t, sample).prev_sample.numpy().reshape(-1))
    return outputs


def scheduler_section():
    cases = [scheduler_case(name, prediction, steps) for name in ("pndm", "dpmpp")
             for prediction in ("epsilon", "v_prediction") for steps in (1, 2, 5, 20, 50)]
    alphas = closed_form.make_scheduler("pndm").alphas_cumprod
    return {"alphas_cumprod": float_list(alphas), "cases": cases}


LOOP_CASES = [
    dict(prompt="a photo of an astronaut riding a horse on mars", seed=0, steps=10),
    dict(prompt="a cat", negative_prompt="blurry, low quality", seed=42, steps=6, guidance_scale=5.0),
    dict(prompt="a cat", seed=42, steps=6, rng="torch"),
    dict(prompt="castle at sunset", seed=7, steps=8, scheduler="dpmpp"),
    dict(prompt="castle at sunset", seed=7, steps=20, scheduler="dpmpp", rng="torch", guidance_scale=1.0),
    dict(prompt="a dog", seed=3, steps=7, prediction_type="v_prediction"),
    dict(prompt="a dog", seed=3, steps=7, scheduler="dpmpp", prediction_type="v_prediction"),
    dict(prompt="watercolor forest", seed=11, steps=10, strength=0.6),
    dict(prompt="watercolor forest", seed=11, steps=10, strength=0.75, scheduler="dpmpp", rng="torch"),
    dict(prompt="", seed=5, steps=4, latent_size=4, disable_safety=True),
    # The schedulers that scale the UNet input, start from sigma_max-scaled noise or draw step noise.
    dict(prompt="a lighthouse", seed=21, steps=10, scheduler="euler"),
    dict(prompt="a lighthouse", seed=21, steps=8, scheduler="euler_a"),
    dict(prompt="a lighthouse", seed=21, steps=8, scheduler="euler_a", rng="torch", prediction_type="v_prediction"),
    dict(prompt="a lighthouse", seed=22, steps=9, scheduler="ddim", prediction_type="v_prediction"),
    dict(prompt="a lighthouse", seed=23, steps=12, scheduler="lms"),
    dict(prompt="a lighthouse", seed=24, steps=4, scheduler="lcm", guidance_scale=1.5),
    dict(prompt="watercolor forest", seed=11, steps=10, strength=0.6, scheduler="euler"),
    dict(prompt="watercolor forest", seed=11, steps=10, strength=0.6, scheduler="euler_a", rng="torch"),
]


def loop_section(tokenize):
    cases = []
    for spec in LOOP_CASES:
        config = closed_form.LoopConfig(**spec)
        result = closed_form.run_loop(config, tokenize)
        cases.append({**config.__dict__, "timesteps": result.timesteps, "latents": float_list(result.latents),
                      "unsafe": result.unsafe, "rgb_crc32": zlib.crc32(result.rgb.tobytes()),
                      "rgb_head": [int(v) for v in result.rgb.reshape(-1)[:48]]})
    return {"hidden_size": closed_form.HIDDEN_SIZE, "cases": cases}


def build() -> dict:
    tokenize = make_tokenizer()
    return {
        "generator": "scripts/make_golden_vectors.py",
        "tokenizer": tokenizer_section(tokenize),
        "random": random_section(),
        "schedulers": scheduler_section(),
        "loop": loop_section(tokenize),
    }


def dumps(golden: dict) -> str:
    return json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", type=Path, default=GOLDEN_PATH, help=f"output file (default: {GOLDEN_PATH})")
    args = parser.parse_args()
    args.o.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(build())
    args.o.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode())} bytes to {args.o}")


if __name__ == "__main__":
    main()
