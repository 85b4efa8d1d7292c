"""Where the mil pipeline's time per step goes: the UNet's predict calls inside the pipeline, split into input
checks, host-to-device copies, the plan's execution and device-to-host copies, against the loop's time per step.

    python3 scripts/profile_pipeline_steps.py --family sd1 --steps 20 --torch-compile   # on a CUDA machine
    python3 scripts/profile_pipeline_steps.py --family tiny --steps 10                  # CPU

Same models and conversion as scripts/bench_pipeline.py (its --work-dir is shared, so one converts for both).
"""
import argparse
import time
from pathlib import Path

import bench_pipeline


def timed_predict(mil, parts: dict, sync):
    """MILModel.predict's own steps, each timed (the device synchronised after each, so times are not shifted)."""
    import torch

    def predict(inputs, state=None):
        marks = [time.perf_counter()]
        mil._check(inputs)
        marks.append(time.perf_counter())
        with torch.inference_mode():
            tensors = {n: mil._to_device(n, a) for n, a in inputs.items()}
            sync()
            marks.append(time.perf_counter())
            outs = mil._execute(tensors, state)
            sync()
            marks.append(time.perf_counter())
            result = {n: t.detach().to("cpu").numpy().astype(mil.output_description[n].dtype, copy=False)
                      for n, t in outs.items()}
        marks.append(time.perf_counter())
        for name, start, end in zip(PARTS, marks, marks[1:]):
            parts[name] += end - start
        parts["calls"] += 1
        return result
    return predict


PARTS = ("check", "to_device", "execute", "to_host")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", help="registry family (default: sd1, full-size SD 1.5)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--torch-compile", action="store_true", help="the pipeline's --torch-compile")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/python_coreml_sd_bench"))
    args = parser.parse_args()
    import torch
    from python_coreml_sd.console import quiet_third_party
    from python_coreml_sd.generation.pipeline import GenerationRequest
    from python_coreml_sd.generation.setup import build_pipeline
    quiet_third_party()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder, models_dir = bench_pipeline.prepare(args.family, args.work_dir, "ORIGINAL", False)
    source, models = bench_pipeline.mil_models(folder, models_dir, device, False, torch_compile=args.torch_compile)
    pipe = build_pipeline(models, source, progress=False)
    mil = models["unet"].model
    parts = dict.fromkeys((*PARTS, "calls"), 0)
    mil.predict = timed_predict(mil, parts, torch.cuda.synchronize if device == "cuda" else (lambda: None))
    pipe.generate(GenerationRequest(prompt="a cat", seed=1, num_inference_steps=2))  # compilation, graph capture
    parts.update(dict.fromkeys(parts, 0))
    result = pipe.generate(GenerationRequest(prompt="a cat", seed=1, num_inference_steps=args.steps))
    calls = max(parts["calls"], 1)
    print(f"{args.family} on {device}: loop {result.seconds_per_step * 1e3:.2f} ms / step; UNet call " +
          ", ".join(f"{k} {parts[k] / calls * 1e3:.2f}" for k in PARTS) + " ms" +
          f" (CUDA graph {mil._use_graph}, torch.compile {mil._torch_compile}, fused chains {mil.plan.num_fused})")


if __name__ == "__main__":
    main()
