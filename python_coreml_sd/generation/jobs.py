"""What the pipeline and parity commands ask for, typed: the library entry points that the CLIs, tests
and scripts call. Everything that can fail is checked before any model loads; outputs are written
atomically and never replace a file unless `overwrite`."""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..controlnets import controlnet_names
from ..errors import UserError
from ..package_io import check_output_dir, prepare_output_dir, replace_atomically
from . import parity, setup
from .images import output_name, save_png
from .pipeline import GenerationRequest, check_control_counts


@dataclass(frozen=True)
class Models:
    """Which models generate: converted ones on a backend (coreml, mil), or the original PyTorch modules."""
    backend: str
    models_dir: Path = None  # converted models (a folder, Resources folder or bundle .zip); None for torch
    model_version: str = "tiny"  # tokenizer and scheduler config (and the torch backend's weights)
    device: str = "cpu"
    compute_unit: str = "ALL"
    torch_precision: str = "float32"
    refiner_version: str = None  # SDXL: the refiner whose UNet the torch backend runs (converted: its package)
    # ControlNets steering the UNet, their residuals scaled and summed (converted: their ControlNet_<name> packages);
    # one name or several, kept as a tuple
    controlnet: tuple = ()
    prediction_type: str = None  # --prediction-type of a single-file --model-version
    torch_compile: bool = False  # mil: run the UNet through torch.compile (MILModel(torch_compile=True))

    def __post_init__(self):
        object.__setattr__(self, "controlnet", controlnet_names(self.controlnet))

    def open(self, img2img: bool = False, progress: bool = True, sizes=()):
        """`sizes`: the requests' (height, width) pixel sizes (the torch backend without converted models takes them)."""
        return setup.open_pipeline(self.backend, self.models_dir, self.model_version, self.device, self.compute_unit,
                                   img2img=img2img, torch_precision=self.torch_precision, progress=progress,
                                   refiner_version=self.refiner_version, controlnet=self.controlnet,
                                   prediction_type=self.prediction_type, torch_compile=self.torch_compile,
                                   sizes=sizes)

    def reference(self, torch_precision: str = "float32") -> "Models":
        """The original modules of the same model on the same device."""
        return Models("torch", self.models_dir, self.model_version, self.device, torch_precision=torch_precision,
                      refiner_version=self.refiner_version, controlnet=self.controlnet,
                      prediction_type=self.prediction_type)


@dataclass
class ImageJob:
    models: Models
    requests: list  # GenerationRequest, one image each
    output_dir: Path = Path(".")
    overwrite: bool = False

    def targets(self) -> list:
        return [Path(self.output_dir) / output_name(r.prompt, r.seed) for r in self.requests]


@dataclass
class ParityJob:
    converted: Models
    requests: list  # GenerationRequest, compared one by one
    output_dir: Path
    threshold_db: float = 30.0
    torch_precision: str = "float32"  # of the reference
    overwrite: bool = False
    outputs: tuple = field(default=("report.json", "grid.png"), init=False)

    def targets(self) -> list:
        return [Path(self.output_dir) / name for name in self.outputs]


def _check_job(requests: list, output_dir: Path, targets: list, overwrite: bool, controlnets: tuple) -> None:
    if not requests:
        raise UserError("nothing to generate: no prompt and seed given")
    for request in requests:
        request.validate()
    for request in requests:
        check_control_counts(request, len(controlnets), controlnets)
    check_output_dir(output_dir)
    for target in targets:  # refuse before generating, not after
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists; pass --overwrite to replace it or choose another -o")


def generate_images(job: ImageJob, parameters=lambda request: {}) -> list:
    """PNG files of the job's requests (with `parameters(request)` in their text chunks); returns their paths."""
    targets = job.targets()
    _check_job(job.requests, job.output_dir, targets, job.overwrite, job.models.controlnet)
    pipe = job.models.open(img2img=any(r.image is not None for r in job.requests), sizes=requested_sizes(job.requests))
    for request in job.requests:  # what these models cannot do, before the folder is made
        pipe.check_request(request)
    prepare_output_dir(Path(job.output_dir))
    written = []
    for request, target in zip(job.requests, targets):
        result = pipe.generate(request)
        if result.flagged:
            print(f"the safety checker flagged seed {request.seed}; the image was replaced by a black one",
                  file=sys.stderr)
        written.append(save_png(result.image, target, parameters(request), job.overwrite))
        print(f"{target} ({result.seconds_per_step:.3f} s/step, {result.seconds_total:.1f} s total)", file=sys.stderr)
    return written


def run_parity(job: ParityJob) -> dict:
    """Generate with the reference and the converted models; returns the report and writes report.json and
    grid.png (converted beside reference, and their amplified difference) to the job's output folder."""
    targets = job.targets()
    _check_job(job.requests, job.output_dir, targets, job.overwrite, job.converted.controlnet)
    img2img = any(r.image is not None for r in job.requests)
    converted = job.converted.open(img2img=img2img, progress=False)
    reference = job.converted.reference(job.torch_precision).open(progress=False, sizes=requested_sizes(job.requests))
    report, pairs = parity.run(reference, converted, job.requests, job.threshold_db)
    report.update(backend=job.converted.backend, device=job.converted.device,
                  model_version=job.converted.model_version, models_dir=str(job.converted.models_dir))
    prepare_output_dir(Path(job.output_dir))
    replace_atomically(lambda tmp: tmp.write_text(json.dumps(report, indent=2)), targets[0], job.overwrite)
    replace_atomically(lambda tmp: parity.grid(pairs).save(tmp, format="PNG"), targets[1], job.overwrite)
    return report


def requested_sizes(requests) -> tuple:
    """The (height, width) pixel sizes the requests ask for (None: the models' default)."""
    return tuple(dict.fromkeys((r.height, r.width) for r in requests if r.height or r.width))


def requests_for(prompts, seeds, **common) -> list:
    """One request per prompt and seed, with the same settings."""
    return [GenerationRequest(prompt=p, seed=s, **common) for p in prompts for s in seeds]
