"""The models one generation needs, behind one face: `predict({name: array}) -> {name: array}`.

Backends differ only here. `coreml` and `mil` run converted .mlpackage files; `torch` runs the
original diffusers modules through the very wrappers the converters trace, so all three take and
return the same names, shapes and layouts.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..components import (RESIDUAL, SD, SDXL, TABLE, Dims, component_of, is_unet, residual_shapes, sample_dims,
                          text_pooled_width, with_residuals, xl_dims)
from ..layers.unet import DiffusersControlledUNet, DiffusersControlNet, DiffusersUNet
from ..errors import UserError

@dataclass
class Component:
    model: object  # has predict(dict) -> dict
    input_shapes: dict  # name -> tuple
    input_dtypes: dict = field(default_factory=dict)  # name -> numpy dtype the package declares
    enumerated: dict = field(default_factory=dict)  # name -> [shapes] for inputs of Core ML enumerated shapes

    def allowed(self, name: str) -> list:
        """The shapes input `name` takes, the default first (one, unless the package enumerates several)."""
        return list(dict.fromkeys(self.enumerated.get(name) or [self.input_shapes[name]]))

    def predict(self, inputs: dict) -> dict:
        # Each input as the package declares it (fp16 for Apple's and our fp16 packages, fp32 for older
        # ones and token ids), so that runtimes checking dtypes strictly take them; float32 outputs stay.
        cast = {k: np.asarray(v).astype(self.input_dtypes[k], copy=False) if k in self.input_dtypes else v
                for k, v in inputs.items()}
        return self.model.predict(cast)


@dataclass
class ModelSet:
    components: dict = field(default_factory=dict)  # name -> Component
    # The UNet takes a text context of any number of windows (the torch modules without converted packages:
    # diffusers' UNet takes any sequence length), so each prompt gets as many as its tokens fill.
    any_prompt_length: bool = False

    def __contains__(self, name):
        return name in self.components

    def __getitem__(self, name) -> Component:
        return self.components[name]

    @property
    def has_unet(self) -> bool:
        return "unet" in self or ("unet_chunk1" in self and "unet_chunk2" in self)

    def has_refiner(self) -> bool:
        return "refiner" in self or ("refiner_chunk1" in self and "refiner_chunk2" in self)

    def unet_input_shapes(self, unet: str = "unet") -> dict:
        """The inputs of the UNet (`unet`: "unet" or SDXL's "refiner"), whole or chunked."""
        if unet in self:
            return self[unet].input_shapes
        first, second = self[f"{unet}_chunk1"].input_shapes, self[f"{unet}_chunk2"].input_shapes
        # the UNet's own inputs, not the tensors crossing the cut: a controlled UNet's residuals too
        return {k: v for k, v in {**second, **first}.items()
                if k in TABLE[unet].io(SDXL).inputs or k.startswith(RESIDUAL.format(""))}

    def unet_allowed(self, name: str, unet: str = "unet") -> list:
        """The shapes the UNet's input `name` takes (chunked: those of the first chunk taking it; the chunks'
        enumerated shapes pair index by index)."""
        if unet in self:
            return self[unet].allowed(name)
        return next(self[chunk].allowed(name) for chunk in (f"{unet}_chunk1", f"{unet}_chunk2")
                    if name in self[chunk].input_shapes)

    @property
    def controlnets(self) -> list:
        """The keys of the ControlNets steering the UNet, in the order their residuals are summed."""
        return [name for name in self.components if is_controlnet_key(name)]

    @property
    def family(self) -> str:
        """The interface family of these models (python_coreml_sd.components): SDXL when the UNet takes
        SDXL's added conditions."""
        return SDXL if set(TABLE["unet"].io(SDXL).inputs) <= set(self.unet_input_shapes()) else SD

    def run_unet(self, inputs: dict, unet: str = "unet") -> np.ndarray:
        if unet in self:
            return self[unet].predict(inputs)["noise_pred"]
        # Each chunk reads the original inputs it needs (a controlled UNet's residuals go to the chunk adding
        # them), chunk 2 also chunk 1's outputs, by name.
        first, second = self[f"{unet}_chunk1"], self[f"{unet}_chunk2"]
        hidden = first.predict({k: v for k, v in inputs.items() if k in first.input_shapes})
        return second.predict({k: v for k, v in {**inputs, **hidden}.items() if k in second.input_shapes})["noise_pred"]


def controlnet_key(index: int) -> str:
    """The ModelSet key of the index-th ControlNet (several may run at once; each is a `controlnet` component)."""
    return f"controlnet_{index}"


def is_controlnet_key(name: str) -> bool:
    return name.startswith("controlnet_") and name[len("controlnet_"):].isdigit()


def table_name(key: str) -> str:
    """The component-table entry of a ModelSet key."""
    return "controlnet" if is_controlnet_key(key) else key


def find_packages(folder: Path, model_version: str = None) -> dict:
    """Map component -> package path in a folder of converted models (our names or Apple's Resources names).

    A folder with two packages of one component (two models' UNets) is refused rather than one picked
    silently, unless one of them is named after `model_version` (what torch2coreml wrote for it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"models folder {folder} does not exist; pass -i with the folder of converted models")
    candidates = {}
    for path in sorted(folder.iterdir()):
        name = component_of(path)
        if name and name != "controlnet":  # ControlNets: one folder holds several, chosen by name (--controlnet)
            candidates.setdefault(name, []).append(path)
    return {name: _one_package(folder, name, paths, model_version) for name, paths in candidates.items()}


def _one_package(folder: Path, component: str, paths: list, model_version: str) -> Path:
    if len(paths) == 1:
        return paths[0]
    wanted = [p for p in paths if model_version and p.name == TABLE[component].package_name(model_version)]
    if len(wanted) == 1:
        return wanted[0]
    raise UserError(f"models folder {folder} holds {len(paths)} {component} packages ({', '.join(p.name for p in paths)}); "
                    "pass --model-version naming the model they were converted from, or -i a folder with one "
                    "model's packages")


_ARRAY_DTYPES = {65552: np.float16, 65568: np.float32, 65600: np.float64, 131104: np.int32}


def _package_inputs(path: Path) -> tuple:
    """(name -> shape, name -> numpy dtype, name -> enumerated shapes) of the inputs a package or compiled model
    declares (a compiled model's enumerated shapes are left to Core ML)."""
    from ..package_check import check_package, load_spec
    if path.suffix == ".mlmodelc":
        return _compiled_inputs(check_package(path))
    spec = load_spec(path)
    features = spec.description.input
    return ({f.name: tuple(f.type.multiArrayType.shape) for f in features},
            {f.name: _ARRAY_DTYPES[f.type.multiArrayType.dataType] for f in features
             if f.type.multiArrayType.dataType in _ARRAY_DTYPES},
            {f.name: [tuple(s.shape) for s in f.type.multiArrayType.enumeratedShapes.shapes] for f in features
             if f.type.multiArrayType.WhichOneof("ShapeFlexibility") == "enumeratedShapes"})


def _compiled_inputs(path: Path) -> tuple:
    """A compiled model's metadata.json input schema (dtype and shape), where it has one."""
    import json
    try:
        schema = json.loads((path / "metadata.json").read_text())[0]["inputSchema"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}, {}, {}  # Core ML checks shapes itself
    shapes, dtypes = {}, {}
    for entry in schema:
        try:
            shapes[entry["name"]] = tuple(json.loads(entry["shape"]))
        except (KeyError, ValueError, TypeError):
            pass
        dtype = {"float16": np.float16, "float32": np.float32, "int32": np.int32}.get(
            str(entry.get("dataType", "")).lower())
        if dtype is not None and "name" in entry:
            dtypes[entry["name"]] = dtype
    return shapes, dtypes, {}


# Inputs the pipeline feeds each component by name (the VAE encoder has two interfaces: pipeline.py).
# The VAE encoder is left out: the pipeline still drives encoders of the interface before issue 14.
REQUIRED_INPUTS = {name: spec.inputs for name, spec in TABLE.items() if name != "vae_encoder" and spec.inputs}


def check_inputs(component: str, path: Path, shapes: dict) -> None:
    """A UserError naming the package and the input the pipeline would feed it but it does not declare."""
    missing = [name for name in REQUIRED_INPUTS.get(component, ()) if name not in shapes]
    if shapes and missing:  # a compiled model without readable metadata declares none: Core ML checks
        raise UserError(f"{path} has no input {missing[0]!r} (it takes {', '.join(shapes) or 'none'}); the "
                        f"pipeline feeds its {component} {', '.join(REQUIRED_INPUTS[component])}: reconvert it "
                        "with python -m python_coreml_sd.torch2coreml")


def with_controlnet(found: dict, folder: Path, controlnets=()) -> dict:
    """The packages a generation runs: with `controlnets` (names), their packages and the controlled UNet in the
    UNet's place (as Apple's pipeline); without, no controlled UNet."""
    controlled = found.pop("control-unet", None)
    # the chunked controlled UNet (--chunk-unet), run as the whole when that is absent, as the plain UNet's chunks
    chunks = {name: found.pop(f"control-unet_{name}", None) for name in ("chunk1", "chunk2")}
    if not controlnets:
        return found
    paths = [Path(folder) / TABLE["controlnet"].package_name(name) for name in controlnets]
    for name, path in zip(controlnets, paths):
        if not path.exists():
            raise UserError(f"models folder {folder} has no {path.name}; convert the ControlNet with python -m "
                            f"python_coreml_sd.torch2coreml --convert-controlnet {name}")
    nets = {controlnet_key(i): path for i, path in enumerate(paths)}
    if controlled is None and all(chunks.values()):  # in the plain UNet's place, as its chunks
        found.pop("unet", None)
        return {**found, **{f"unet_{name}": chunk for name, chunk in chunks.items()}, **nets}
    if controlled is None:
        raise UserError(f"--controlnet needs a UNet taking ControlNet residuals and models folder {folder} has none "
                        "(its UNet has no additional_residual inputs); convert one with --convert-unet "
                        "--unet-support-controlnet")
    for name in ("unet_chunk1", "unet_chunk2"):
        found.pop(name, None)
    return {**found, "unet": controlled, **nets}


def load_converted(folder: Path, backend: str, device: str = "cpu", compute_unit: str = "ALL",
                   needed=(), model_version: str = None, controlnets=(),
                   torch_compile: bool = False) -> ModelSet:
    from ..runtime import load_model
    found = with_controlnet(find_packages(folder, model_version), folder, controlnets)
    missing = [name for name in needed if name not in found and not (name == "unet" and "unet_chunk1" in found)]
    if missing:
        raise UserError(f"models folder {folder} has no {', '.join(missing)} package; convert it with "
                        f"python -m python_coreml_sd.torch2coreml --convert-{missing[0].replace('_', '-')}")
    for unet in ("unet", "refiner"):
        if unet in found:  # prefer the whole UNet over its chunks
            found.pop(f"{unet}_chunk1", None), found.pop(f"{unet}_chunk2", None)
    # Every package is checked (safe, the inputs the pipeline feeds) before the first one loads.
    inputs = {name: _package_inputs(path) for name, path in found.items()}
    for name, path in found.items():
        check_inputs(table_name(name), path, inputs[name][0])
    return ModelSet({name: Component(load_model(path, backend=backend, device=device, compute_unit=compute_unit,
                                                **_runtime_options(name, backend, device, torch_compile)),
                                     *inputs[name]) for name, path in found.items()})


def _runtime_options(component: str, backend: str, device: str, torch_compile: bool = False) -> dict:
    """MILModel options: the UNet runs every step with the same shapes, so on CUDA one captured graph replaces
    ~2,000 launches, and (torch_compile) Inductor's fused kernels repay their compile time over the steps. On
    the CPU its plan is fused as well: fp16 ops in fp32 without rounding each result, as Core ML's CPU compute
    unit runs them, and fewer, larger kernels. Components that run once per image stay op by op: compiling
    them would cost more than it saves."""
    if backend != "mil" or not is_unet(component):
        return {}
    return {"fuse": True, **({"cuda_graph": True} if device == "cuda" else {}),
            **({"torch_compile": True} if torch_compile else {})}


class TorchModel:
    """Runs a PyTorch module with the converted model's names: numpy in, numpy (fp32) out."""

    def __init__(self, module, input_names, output_names, device="cpu", dtype=torch.float32):
        self.module = module.to(device=device, dtype=dtype).eval()
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def predict(self, inputs: dict) -> dict:
        args = [self._tensor(name, inputs[name]) for name in self.input_names]
        outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outputs)}

    def _tensor(self, name, value):
        tensor = torch.as_tensor(np.asarray(value), device=self.device)
        # Token ids stay fp32: fp16 holds integers exactly only up to 2048, CLIP's ids reach 49407.
        return tensor.float() if name == "input_ids" else tensor.to(self.dtype)


def load_torch(source, latent_hw, device="cpu", dtype=torch.float32, with_safety_checker=True,
               refiner=None, controlnets=(), latent_sizes=(), prompt_chunks: int = 1) -> ModelSet:
    """The reference path: the original diffusers modules of `source`, wrapped like the converters wrap them;
    `refiner`: an SDXL refiner's ModelSource, whose UNet joins them (its text encoder is the base's second, as
    the SDXL models share it and Apple's pipeline uses it); `controlnets`: ControlNetSources, run with the UNet
    taking their residuals in the UNet's place. `latent_sizes` ((h, w), `latent_hw` first when absent) and
    `prompt_chunks`: the shapes the modules are declared to take, as a package converted with --latent-sizes and
    --max-prompt-chunks would (PyTorch takes any; the pipeline picks among the declared ones)."""
    from ..convert.safety_checker import SafetyChecker
    from ..convert.text_encoder import wrapper_for
    from ..convert.vae import VAEDecoder, VAEEncoder

    family = source.interface
    text_encoder, unet, vae = source.load_text_encoder(), source.load_unet(), source.load_vae()
    checker = source.load_safety_checker() if with_safety_checker and source.has("safety_checker") else None
    dims = Dims(*latent_hw, text_hidden=unet.config.cross_attention_dim, **sample_dims(unet.config),
                sequence=text_encoder.config.max_position_embeddings,
                clip_image=checker.config.vision_config.image_size if checker else Dims.clip_image)
    modules = {"text_encoder": wrapper_for(text_encoder, family), "unet": DiffusersUNet(unet),
               "vae_decoder": VAEDecoder(vae), "vae_encoder": VAEEncoder(vae)}
    if family == SDXL:
        modules["text_encoder_2"] = wrapper_for(source.load_text_encoder_2(), family)
        dims = xl_dims(dict(unet.config), dims.unet_batch, *latent_hw, dims.sequence, text_pooled_width(source))
    if checker is not None:
        modules["safety_checker"] = SafetyChecker(checker)
    specs = {name: name for name in modules}  # module -> its table entry
    if controlnets:
        for controlnet in controlnets:
            controlnet.check_fits(dict(unet.config), source.name)
        dims = replace(dims, residuals=residual_shapes(unet.config, *latent_hw))
        modules["unet"], specs["unet"] = DiffusersControlledUNet(unet), "control-unet"
        for i, controlnet in enumerate(controlnets):
            modules[controlnet_key(i)], specs[controlnet_key(i)] = DiffusersControlNet(controlnet.load()), "controlnet"
    all_dims = {name: dims for name in modules}
    if refiner is not None:
        refiner_unet = refiner.load_unet()
        modules["refiner"], specs["refiner"] = DiffusersUNet(refiner_unet), "refiner"
        all_dims["refiner"] = xl_dims(dict(refiner_unet.config), dims.unet_batch, *latent_hw, dims.sequence,
                                      text_pooled_width(refiner))
    sizes = tuple(latent_sizes) or (tuple(latent_hw),)
    io = {name: TABLE[spec].io(family) for name, spec in specs.items()}  # names with the numbered residuals
    return ModelSet({name: Component(TorchModel(module, io[name].input_names(dims), io[name].output_names(dims),
                                                device, dtype),
                                     TABLE[specs[name]].input_shapes(all_dims[name], family),
                                     enumerated=declared_shapes(specs[name], all_dims[name], family, sizes,
                                                                prompt_chunks, unet.config))
                     for name, module in modules.items()})


def declared_shapes(component: str, dims: Dims, family: str, sizes: tuple, prompt_chunks: int, unet_config) -> dict:
    """The enumerated shapes a package of `component` converted for `sizes` and `prompt_chunks` declares (the
    context windows reach the UNets and the ControlNet only; each size its own residuals)."""
    chunks = prompt_chunks if is_unet(component) or component == "controlnet" else 1
    variants = dims.variants(sizes, chunks)
    return TABLE[component].enumerated_shapes(with_residuals(variants, unet_config) if dims.residuals else variants,
                                              family)
