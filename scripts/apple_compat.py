"""Compatibility with Apple's ml-stable-diffusion, proven by running Apple's own code on Linux.

    python scripts/apple_compat.py --apple-repo DIR [--model tiny] [--steps 10] [--work DIR]

DIR is a git checkout (or bare mirror) of apple/ml-stable-diffusion; its code is exported to a temporary
folder and never committed here. Steps, all on one model (default: the embedded `tiny`):

1. A copy of the model with `fp16` variant files (Apple's converter loads `variant="fp16"`).
2. Apple's converter and ours convert every component (text encoder, VAE decoder and encoder, UNet,
   safety checker where the model has one) from that copy, with the same --model-version, so both name
   their packages the same way.
3. Every package's interface (input and output names, shapes, dtypes) is compared.
4. Apple's Python pipeline generates an image from each package set, and so does ours (MIL runtime);
   PSNR of each pipeline's image on our packages against the same pipeline's on Apple's.

Stand-ins Apple's code needs on Linux (docs/compat.md): `coremltools.models.MLModel` inside Apple's
`coreml_model` becomes a class whose `predict` runs our MIL runtime (Core ML's predict exists only on
macOS); `diffusionkit` (SD3 only) is an empty package; transformers 5 dropped the `CLIPFeatureExtractor`
alias, so that one import of Apple's pipeline is rewritten to `CLIPImageProcessor`.
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from python_coreml_sd.components import CONVERTIBLE, TABLE, component_of  # noqa: E402 (after the path insert)

COMPONENTS = CONVERTIBLE  # every one for the interfaces; Apple's Python pipeline then loads what it uses
PROMPT = "a photo of an astronaut riding a horse"


def export_apple_code(repo: Path, dest: Path) -> Path:
    """Apple's Python package from a checkout or bare mirror into dest, plus the Linux stand-ins."""
    repo = repo / "repo" if (repo / "repo").is_dir() else repo  # the search tool's mirror layout
    bare = (repo / "HEAD").is_file() and (repo / "objects").is_dir()
    where = [f"--git-dir={repo}"] if bare else ["-C", str(repo)]
    archive = subprocess.run(["git", *where, "archive", "HEAD", "python_coreml_stable_diffusion"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    pipeline = dest / "python_coreml_stable_diffusion" / "pipeline.py"
    pipeline.write_text(pipeline.read_text().replace(
        "from transformers import CLIPFeatureExtractor,", "from transformers import CLIPImageProcessor as CLIPFeatureExtractor,"))
    stub = dest / "diffusionkit" / "tests"
    stub.mkdir(parents=True)
    (dest / "diffusionkit" / "__init__.py").write_text("")
    (stub / "__init__.py").write_text("")
    (stub / "torch2coreml.py").write_text(
        '"""Stand-in for DiffusionKit: SD3 only, never called for SD 1.x/2.x."""\n'
        "def _sd3_only(*args, **kwargs):\n    raise NotImplementedError('SD3 needs DiffusionKit')\n"
        "convert_mmdit_to_mlpackage = convert_vae_to_mlpackage = _sd3_only\n")
    return dest


def model_with_fp16_variant(model: str, dest: Path) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    from python_coreml_sd.model_sources import resolve
    source = resolve(model)
    shutil.copytree(source.root, dest)
    StableDiffusionPipeline.from_pretrained(str(source.root), torch_dtype=torch.float16).save_pretrained(
        str(dest), variant="fp16")
    return dest


def convert_both(apple_code: Path, model_dir: Path, apple_out: Path, ours_out: Path) -> None:
    flags = [TABLE[c].flag for c in COMPONENTS if (model_dir / TABLE[c].source_folder).is_dir()]  # SD 2.x: no checker
    env = dict(os.environ, PYTHONPATH=str(apple_code))
    subprocess.run([sys.executable, "-m", "python_coreml_stable_diffusion.torch2coreml", "--model-version",
                    str(model_dir), *flags, "-o", str(apple_out)], check=True, env=env, cwd=apple_out.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "python_coreml_sd.torch2coreml", "--model-version", str(model_dir),
                    *flags, "-o", str(ours_out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def interface(package: Path) -> dict:
    import coremltools as ct
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    describe = lambda items: {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
                              for f in items}
    return {"inputs": describe(spec.description.input), "outputs": describe(spec.description.output)}


def compare_interfaces(apple_out: Path, ours_out: Path) -> dict:
    """component -> None when equal, else both interfaces."""
    result = {}
    for package in sorted(apple_out.glob("*.mlpackage")):
        ours, apple = interface(ours_out / package.name), interface(package)
        result[package.name] = None if ours == apple else {"apple": apple, "ours": ours}
    return result


def program_ops(package: Path) -> list:
    """The op types of a package's ML Program (what a runtime must implement to run it)."""
    import coremltools as ct
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    ops = set()

    def walk(block):
        for operation in block.operations:
            ops.add(operation.type)
            for nested in operation.blocks:
                walk(nested)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return sorted(ops)


def ops_per_component(*folders: Path) -> dict:
    """component -> {converter folder name: op types}."""
    table = {}
    for folder in folders:
        for package in sorted(folder.glob("*.mlpackage")):
            component = component_of(package)
            table.setdefault(component, {})[folder.name] = program_ops(package)
    return table


def install_predict_stand_in(apple_code: Path):
    """Import Apple's pipeline with CoreMLModel's MLModel backed by our MIL runtime; returns the module."""
    sys.path.insert(0, str(apple_code))
    import coremltools as ct
    import python_coreml_stable_diffusion.coreml_model as coreml_model
    import python_coreml_stable_diffusion.pipeline as apple_pipeline

    from python_coreml_sd.runtime.mil import MILModel

    class MILBackedMLModel:
        """What CoreMLModel uses of ct.models.MLModel: the spec (for input dtypes) and predict."""
        def __init__(self, path, compute_units=None, optimization_hints=None):
            self._spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
            self._model = MILModel(path)

        def predict(self, inputs):
            return self._model.predict(inputs)

    coreml_model.ct = types.SimpleNamespace(models=types.SimpleNamespace(MLModel=MILBackedMLModel),
                                            ComputeUnit=ct.ComputeUnit)
    return apple_pipeline


def apple_image(apple_pipeline, model_dir: Path, packages: Path, seed: int, steps: int) -> np.ndarray:
    from diffusers import StableDiffusionPipeline
    torch_pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe = apple_pipeline.get_coreml_pipe(pytorch_pipe=torch_pipe, mlpackages_dir=str(packages),
                                          model_version=str(model_dir), compute_unit="CPU_ONLY")
    np.random.seed(seed)  # as Apple's pipeline.main does
    out = pipe(prompt=PROMPT, height=pipe.height, width=pipe.width, num_inference_steps=steps, guidance_scale=7.5)
    return np.asarray(out["images"][0], dtype=np.float64)


def our_image(model_dir: Path, packages: Path, seed: int, steps: int, out_dir: Path) -> np.ndarray:
    from PIL import Image
    subprocess.run([sys.executable, "-m", "python_coreml_sd.pipeline", "--prompt", PROMPT, "-i", str(packages),
                    "-o", str(out_dir), "--seed", str(seed), "--num-inference-steps", str(steps), "--backend", "mil",
                    "--model-version", str(model_dir), "--scheduler", "PNDM"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return np.asarray(Image.open(next(out_dir.glob("*.png"))), dtype=np.float64)


def run(apple_repo: Path, work: Path, model: str = "tiny", steps: int = 10, seed: int = 93) -> dict:
    from python_coreml_sd.metrics import psnr
    apple_code = export_apple_code(apple_repo, work / "apple_code")
    model_dir = model_with_fp16_variant(model, work / "model")
    apple_out, ours_out = work / "apple_packages", work / "our_packages"
    apple_out.mkdir()
    convert_both(apple_code, model_dir, apple_out, ours_out)
    report = {"interfaces": compare_interfaces(apple_out, ours_out), "ops": ops_per_component(apple_out, ours_out)}
    apple_pipeline = install_predict_stand_in(apple_code)
    images = {
        ("apple", "apple"): apple_image(apple_pipeline, model_dir, apple_out, seed, steps),
        ("apple", "ours"): apple_image(apple_pipeline, model_dir, ours_out, seed, steps),
        ("ours", "apple"): our_image(model_dir, apple_out, seed, steps, work / "ours_on_apple"),
        ("ours", "ours"): our_image(model_dir, ours_out, seed, steps, work / "ours_on_ours"),
    }
    report["psnr_db"] = {
        "Apple's pipeline: our packages vs Apple's": psnr(images["apple", "apple"], images["apple", "ours"]),
        "our pipeline: Apple's packages vs ours": psnr(images["ours", "ours"], images["ours", "apple"]),
    }
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apple-repo", type=Path, required=True, help="checkout or bare mirror of apple/ml-stable-diffusion")
    parser.add_argument("--model", default="tiny", help="registry name or diffusers folder (default: tiny)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image (default: 10)")
    parser.add_argument("--work", type=Path, help="folder for the packages and images (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="apple_compat."))
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.apple_repo, work, args.model, args.steps), indent=1, default=str))


if __name__ == "__main__":
    main()
