"""Write swift/Tests/StableDiffusionTests/Resources/nvidia_random.json: torch.randn on a CUDA GPU
(cuRAND Philox), which the Swift NvidiaRandomSource reproduces. Needs a CUDA GPU; the committed file
was made on an NVIDIA H200 (132 SMs) with torch 2.11.0+cu130. Values are float32, written as the
shortest decimal that reads back to them; tensors over 300 elements keep 64 fixed and 64 random
indices plus a CRC32 of all float32 bytes.

    python scripts/make_nvidia_random_vectors.py -o nvidia_random.json
"""
import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch

OUTPUT = Path(__file__).resolve().parent.parent / "swift" / "Tests" / "StableDiffusionTests" / "Resources" / "nvidia_random.json"
SEEDS = [0, 1, 42, 93, 4294967295, 2**40 + 7]
COUNTS = [1, 2, 7, 16, 17, 64, 256, 257, 1024, 16384, 65536]


def shortest(values) -> list:
    return [float(str(np.float32(x))) for x in values]


def build() -> dict:
    props = torch.cuda.get_device_properties(0)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sms": props.multi_processor_count,
           "cases": [], "streams": []}
    for seed in SEEDS:
        for n in COUNTS:
            values = torch.randn(n, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu().numpy()
            case = {"seed": seed, "count": n, "crc32": zlib.crc32(values.astype("<f4").tobytes())}
            if n <= 300:
                case["values"] = shortest(values)
            else:
                picked = list(range(32)) + list(range(n - 32, n)) + [int(i) for i in np.random.RandomState(n).randint(0, n, 64)]
                case["indices"] = sorted(set(picked))
                case["sampled"] = shortest(values[case["indices"]])
            out["cases"].append(case)
    for seed in (0, 7):  # successive draws from one generator: the Philox offset moves on
        generator = torch.Generator("cuda").manual_seed(seed)
        draws = [torch.randn(k, generator=generator, device="cuda").cpu().numpy() for k in (256, 256, 33)]
        out["streams"].append({"seed": seed, "counts": [256, 256, 33], "values": [shortest(d) for d in draws]})
    # Past one pass of the launch (132 SMs x 2048 threads on an H200): several values per thread.
    out["large"] = []
    for seed, n in [(0, 300000), (5, 1200000), (93, 2500001)]:
        values = torch.randn(n, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu().numpy()
        picked = (list(range(16)) + list(range(n - 16, n)) + [int(i) for i in np.random.RandomState(n % 1000).randint(0, n, 200)]
                  + [270335, 270336, 540672, 1081343, 1081344, 1081345])
        indices = sorted(i for i in set(picked) if i < n)
        out["large"].append({"seed": seed, "count": n, "indices": indices, "sampled": shortest(values[indices])})
    generator = torch.Generator("cuda").manual_seed(3)
    torch.randn(1200000, generator=generator, device="cuda")
    out["after_large"] = {"seed": 3, "first": 1200000, "count": 64,
                          "values": shortest(torch.randn(64, generator=generator, device="cuda").cpu().numpy())}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", type=Path, default=OUTPUT)
    args = parser.parse_args()
    args.o.write_text(json.dumps(build(), separators=(",", ":")), encoding="utf-8")
    print(f"wrote {args.o}")


if __name__ == "__main__":
    main()
