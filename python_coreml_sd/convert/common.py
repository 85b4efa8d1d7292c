"""Steps every component converter shares: trace, convert to an ML Program, describe, save atomically,
check against PyTorch."""
import json
import logging
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from .options import DEPLOYMENT_TARGETS, ConversionOptions, format_sizes
from ..components import TABLE, is_unet
from ..package_io import save_mlmodel
from ..errors import CheckFailed, UserError

log = logging.getLogger("python_coreml_sd")

LICENSE = "CreativeML OpenRAIL-M (https://huggingface.co/spaces/CompVis/stable-diffusion-license)"
SHORT_DESCRIPTION = ("Stable Diffusion generates images conditioned on text or other images through the diffusion "
                     "process (https://arxiv.org/abs/2112.10752). Converted by python_coreml_sd.")


def package_name(model_version: str, component: str) -> str:
    """Apple's rule (torch2coreml._get_out_path): the whole --model-version string as given, then every '/'
    of the whole name turned into '_'. A local path `/p/m` gives `Stable_Diffusion_version__p_m_unet`, a
    trailing slash one more '_'; nothing else is normalised (no resolving, no `~` expansion)."""
    return TABLE[component].package_name(model_version)


def output_path(options: ConversionOptions, component: str) -> Path:
    return Path(options.output_dir) / package_name(options.model_version, component)


# Inputs that stay float32 in fp16 packages, as in Apple's: token ids (fp16 holds integers exactly only up
# to 2048; CLIP's ids reach 49407). Every other input of an fp16 package is FLOAT16, of an fp32 one FLOAT32.
FLOAT32_INPUTS = frozenset({"input_ids"})


def input_dtype(name: str, options: ConversionOptions):
    """The dtype an input is declared with: Apple's interface (see docs/compat.md)."""
    if options.compute_precision == "float16" and name not in FLOAT32_INPUTS:
        return np.float16
    return np.float32


def fresh_op_names() -> None:
    """coremltools numbers unnamed ops with class-wide counters (add_0, add_1, ...): each conversion starts
    them at zero, so a package's op names (and bytes) do not depend on what the process made before."""
    from coremltools.converters.mil.mil import Builder
    Builder.name_count.clear()


@contextmanager
def brief_program_strings():
    """coremltools formats whole programs into debug messages whether or not debug logging is on
    (f-strings in PassPipelineManager.apply_pipeline, two per pipeline, and in two passes): 0.6 s each
    on a full-size UNet, 9 s of its conversion. Inside this block a MIL program, function or block
    prints as one line, unless coremltools' logger is at DEBUG (then those messages are wanted)."""
    from coremltools.converters.mil.mil import Block, Function, Program

    if logging.getLogger("coremltools").isEnabledFor(logging.DEBUG):
        yield
        return
    saved = {cls: cls.__str__ for cls in (Program, Function, Block)}
    Program.__str__ = lambda self, *args, **kwargs: f"<MIL program: {', '.join(self.functions)}>"
    Function.__str__ = Block.__str__ = lambda self: f"<MIL block {self.name}: {len(self.operations)} ops>"
    try:
        yield
    finally:
        for cls, method in saved.items():
            cls.__str__ = method


def run_passes(prog, pass_names: list) -> None:
    """Apply MIL graph passes in order, as coremltools' PassPipelineManager does but validating the
    whole program once at the end rather than after every pass (0.35 s a pass on a full-size UNet)."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    for name in pass_names:
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options(None)
        graph_pass(prog)
    prog.validate(check_essential_scope=True)


def flat(value) -> list:
    """A MIL op input's vars: the value itself, or the vars of a tuple input."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def flat_inputs(op) -> list:
    """Every var a MIL op reads."""
    return [var for value in op.inputs.values() for var in flat(value)]


def trace(module: torch.nn.Module, example_inputs: tuple):
    # check_trace=False skips a second full forward pass and graph comparison: 4x faster on a full UNet.
    with torch.no_grad():
        return torch.jit.trace(module.eval(), example_inputs, check_trace=False)


def _deployment_target(name: str):
    import coremltools as ct
    if name not in DEPLOYMENT_TARGETS:
        raise UserError(f"--min-deployment-target {name!r} is not supported; use one of {', '.join(DEPLOYMENT_TARGETS)}")
    return getattr(ct.target, name)


def tensor_types(sample_inputs: dict, options: ConversionOptions, enumerated: dict = None, input_dtypes: dict = None):
    """The ct.TensorType of each input: the example's shape, or Core ML enumerated shapes where `enumerated`
    ({name: [shapes]}, from the component table's `enumerated_shapes`) lists some. The default is the first
    listed, the shape the Neural Engine's program is compiled for (ANE plans are built for the default shape;
    other shapes may fall back to GPU / CPU or be compiled again at load): --latent-sizes' first size."""
    import coremltools as ct
    enumerated, input_dtypes = enumerated or {}, input_dtypes or {}

    def shape(name, value):
        if name not in enumerated:
            return tuple(value.shape)
        return ct.EnumeratedShapes(shapes=[list(s) for s in enumerated[name]], default=list(enumerated[name][0]))
    return [ct.TensorType(name=name, shape=shape(name, value), dtype=input_dtypes.get(name, input_dtype(name, options)))
            for name, value in sample_inputs.items()]


def to_mlprogram(traced, sample_inputs: "OrderedDict[str, torch.Tensor]", output_names: list,
                 options: ConversionOptions, input_dtypes: dict = None, enumerated: dict = None):
    """coremltools.convert to an ML Program (fixed shapes, or `enumerated` ones); returns an MLModel (not loaded)."""
    import coremltools as ct
    inputs = tensor_types(sample_inputs, options, enumerated, input_dtypes)
    precision = {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}[options.compute_precision]
    with brief_program_strings():
        return ct.convert(traced, convert_to="mlprogram", inputs=inputs,
                          outputs=[ct.TensorType(name=name, dtype=np.float32) for name in output_names],
                          compute_precision=precision,
                          minimum_deployment_target=_deployment_target(options.min_deployment_target),
                          skip_model_load=True)


def describe(mlmodel, options: ConversionOptions, component: str, descriptions: dict) -> None:
    """Metadata Apple's pipelines and Xcode show, plus our own user-defined fields."""
    mlmodel.short_description = SHORT_DESCRIPTION
    mlmodel.author = f"Converted from {options.model_version}; refer to its model card"
    mlmodel.license = LICENSE
    mlmodel.version = options.model_version
    for name, text in descriptions.items():
        if name in mlmodel.input_description:
            mlmodel.input_description[name] = text
        else:
            mlmodel.output_description[name] = text
    meta = mlmodel.user_defined_metadata
    meta["com.python_coreml_sd.source_model"] = options.model_version
    meta["com.python_coreml_sd.component"] = component
    meta["com.python_coreml_sd.converter_version"] = __version__
    meta["com.python_coreml_sd.compute_precision"] = options.compute_precision
    meta["com.python_coreml_sd.min_deployment_target"] = options.min_deployment_target
    if is_unet(component):  # with the most windows its context takes
        meta["com.python_coreml_sd.attention_implementation"] = options.attention_implementation
        meta["com.python_coreml_sd.max_prompt_chunks"] = str(options.max_prompt_chunks)
    meta[FLAGS_KEY] = json.dumps(recorded_flags(options, component), sort_keys=True)
    if options.latent_sizes:  # the enumerated shapes, for people and bundles (default first)
        meta["com.python_coreml_sd.latent_sizes"] = format_sizes(options.latent_sizes)
    if options.quantize_nbits:
        meta["com.python_coreml_sd.quantize_nbits"] = str(options.quantize_nbits)
    if options.mixed_bit_recipe and is_unet(component):
        meta["com.python_coreml_sd.mixed_bit_recipe"] = Path(options.mixed_bit_recipe).name
    # The model edits: each LoRA (file, sha256, scale) on every package, the embeddings on the text encoder's,
    # the replacement VAE on the VAE's.
    from ..model_edits import embedding_records, lora_records
    if options.loras:
        meta["com.python_coreml_sd.loras"] = json.dumps(lora_records(options), sort_keys=True)
    if options.textual_inversions and component == "text_encoder":
        meta["com.python_coreml_sd.textual_inversions"] = json.dumps(embedding_records(options), sort_keys=True)
    if options.custom_vae_version and component.startswith("vae"):
        meta["com.python_coreml_sd.custom_vae_version"] = str(options.custom_vae_version)


def compress(mlmodel, options: ConversionOptions, component: str):
    """Palettize the converted program when asked: `--quantize-nbits` for every component, a mixed-bit
    recipe for the UNet (its layer names are the UNet's). Returns the model to save."""
    recipe = options.mixed_bit_recipe if is_unet(component) else None
    if not options.quantize_nbits and not recipe:
        return mlmodel
    from ..compression.recipes import load_recipe
    from ..compression.palettize import palettize_model
    return palettize_model(mlmodel, options.quantize_nbits, options.palettize_granularity,
                           options.palettize_group_size, recipe=load_recipe(recipe) if recipe else None)


def pin_enumerated_shapes(mlmodel, enumerated: dict) -> None:
    """Each input's enumerated shapes in the model description exactly as listed. coremltools moves every
    shape equal to the default to the front, which breaks the index-by-index pairing of several enumerated
    inputs (iOS 18): (8x24 latents, 77 tokens) would become (8x24, 154)."""
    for feature in mlmodel._spec.description.input:
        if feature.name in enumerated:
            shapes = feature.type.multiArrayType.enumeratedShapes.shapes
            del shapes[:]
            for shape in enumerated[feature.name]:
                shapes.add().shape.extend(shape)


def save_converted(mlmodel, options: ConversionOptions, component: str, enumerated: dict = None,
                   out: Path = None) -> Path:
    """Palettize if asked, pin the enumerated shapes, save atomically at `out` (default: the component's path)."""
    mlmodel = compress(mlmodel, options, component)
    pin_enumerated_shapes(mlmodel, enumerated or {})
    return save_mlmodel(mlmodel, out or output_path(options, component), options.overwrite)


def check_correctness(reference: dict, mlpackage: Path, inputs: dict, threshold: float) -> dict:
    """Run the converted model (Core ML on macOS, the MIL runtime elsewhere) on `inputs` and compare each
    output with the PyTorch `reference`. Prints PSNR per output; raises CheckFailed under `threshold`."""
    from ..metrics import psnr
    from ..runtime import default_backend, load_model

    model = load_model(mlpackage, backend=default_backend())
    outputs = model.predict({k: np.asarray(v) for k, v in inputs.items()})
    results = {name: psnr(ref, outputs[name]) for name, ref in reference.items()}
    for name, value in results.items():
        print(f"  {mlpackage.name}: {name} PSNR {value:.1f} dB (threshold {threshold:.1f} dB)")
    failing = {k: v for k, v in results.items() if v < threshold}
    if failing:
        raise CheckFailed(f"{mlpackage.name}: PSNR under {threshold} dB for "
                          + ", ".join(f"{k} ({v:.1f} dB)" for k, v in failing.items()))
    return results


FLAGS_KEY = "com.python_coreml_sd.flags"
SHARED_FLAGS = ("model_version", "compute_precision", "min_deployment_target", "latent_h", "latent_w",
                "latent_sizes", "text_token_sequence_length", "quantize_nbits", "palettize_granularity", "palettize_group_size")
UNET_FLAGS = ("attention_implementation", "unet_batch_one", "chunk_unet", "mixed_bit_recipe", "max_prompt_chunks")


def recorded_flags(options: ConversionOptions, component: str) -> dict:
    """The flags that shape `component`'s package, as recorded in it and compared before reusing it."""
    names = SHARED_FLAGS + (UNET_FLAGS if is_unet(component) else ())
    flags = {name: getattr(options, name) for name in names}
    flags["latent_sizes"] = format_sizes(options.latent_sizes) or None  # JSON keeps no tuples: as the flag reads
    if component.startswith("refiner"):
        flags["refiner_version"] = options.refiner_version
    if component == "controlnet":
        flags["unet_batch_one"] = options.unet_batch_one
    flags.update(EDIT_FLAG_DEFAULTS)
    if options.edits_model:  # the edits by content (sha256), so that a changed file is not taken for the same
        from ..model_edits import embedding_records, lora_records
        flags.update(loras=[[r["sha256"], r["scale"]] for r in lora_records(options)],
                     textual_inversions=[[r["sha256"], r["token"]] for r in embedding_records(options)],
                     custom_vae_version=options.custom_vae_version)
    return flags


# What a package recorded before these flags existed means: no edits.
EDIT_FLAG_DEFAULTS = {"loras": [], "textual_inversions": [], "custom_vae_version": None}
# ... and what it means for flags added later: the one shape they default to.
LATER_FLAG_DEFAULTS = {**EDIT_FLAG_DEFAULTS, "latent_sizes": None, "max_prompt_chunks": 1}


def reusable_existing(paths: list, options: ConversionOptions, component: str) -> bool:
    """True when every output of `component` exists, was made with the same flags, and --overwrite was
    not given. An existing output made otherwise, or not a package, is a UserError."""
    if options.overwrite or not all(Path(p).exists() for p in paths):
        return False
    recorded = _recorded_flags_of(Path(paths[0]))
    differing = sorted(k for k, v in recorded_flags(options, component).items() if recorded.get(k, LATER_FLAG_DEFAULTS.get(k, v)) != v)
    if recorded and not differing:
        return True
    why = ("was made with other flags: " + ", ".join(f"{k}={recorded[k]!r}" for k in differing) if recorded
           else "records no conversion flags (made by another tool or an older version)")
    raise UserError(f"{paths[0]} exists but {why}; pass the same flags, --overwrite, or another -o")


def kept_existing(paths: list, options: ConversionOptions, component: str) -> bool:
    """reusable_existing, and says so."""
    if not reusable_existing(paths, options, component):
        return False
    log.info("%s: %s exist(s), skipping (pass --overwrite to replace)", component, ", ".join(map(str, paths)))
    return True


def _recorded_flags_of(package: Path) -> dict:
    from coremltools.models.utils import _get_model_spec_path
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(Path(_get_model_spec_path(str(package))).read_bytes())
    except Exception as exc:  # OSError, or protobuf's own DecodeError for a file that is no spec
        raise UserError(f"{package} exists but is not a readable .mlpackage ({type(exc).__name__}); remove it "
                        "or pass --overwrite") from None
    try:
        return json.loads(spec.description.metadata.userDefined.get(FLAGS_KEY, "{}"))
    except ValueError:
        return {}


def convert_traced_component(module, inputs: "OrderedDict[str, torch.Tensor]", output_names: list,
                             options: ConversionOptions, component: str, descriptions: dict,
                             checked_outputs: list = None, enumerated: dict = None, out: Path = None,
                             metadata: dict = None) -> list:
    """Trace `module`, convert (`enumerated`: the inputs' enumerated shapes), describe (plus the user-defined
    `metadata`), palettize if asked, save atomically (to `out`, default the component's output path), and with
    --check-output-correctness compare `checked_outputs` (default: all) with PyTorch."""
    out = out or output_path(options, component)
    fresh_op_names()
    mlmodel = to_mlprogram(trace(module, tuple(inputs.values())), inputs, output_names, options, enumerated=enumerated)
    describe(mlmodel, options, component, descriptions)
    mlmodel.user_defined_metadata.update(metadata or {})
    save_converted(mlmodel, options, component, enumerated, out)
    if options.check_output_correctness:
        with torch.no_grad():
            outputs = module(*inputs.values())
        outputs = dict(zip(output_names, outputs if isinstance(outputs, tuple) else (outputs,)))
        reference = {name: outputs[name].numpy() for name in (checked_outputs or output_names)}
        check_correctness(reference, out, {k: v.numpy().astype(np.float32) for k, v in inputs.items()},
                          options.psnr_threshold)
    return [out]
