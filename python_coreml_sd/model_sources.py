"""`--model-version` -> a model source: a local diffusers folder, a registry name, or a hub repo id.

Every source ends up as a local diffusers folder that is loaded by the same code, component by
component, so a full-size conversion never holds more than it needs in memory.
"""
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import registry
from .components import MODEL_CLASSES, TOKENIZER
from .errors import UserError, first_line

# The module each model_index.json library's classes are imported from.
LIBRARY_MODULES = {"stable_diffusion": "diffusers.pipelines.stable_diffusion.safety_checker"}


@dataclass
class ModelSource:
    name: str  # what the user passed; names the outputs
    root: Path  # the diffusers folder

    @property
    def index(self) -> dict:
        return read_json_object(self.root / "model_index.json")

    def has(self, component: str) -> bool:
        entry = self.index.get(component)
        return bool(isinstance(entry, list) and entry and entry[0] is not None and (self.root / component).is_dir())

    def require(self, component: str, flag: str = None) -> None:
        """The folder holds `component` of a supported class; `flag`: the --convert-* flag that asked for it (the
        message says to drop it), None where no flag did (generation: use another model)."""
        if not self.has(component):
            fix = f"drop {flag} or use a model that has one" if flag else "use a model that has one"
            raise UserError(f"model {self.name!r} has no {component} (no '{component}' folder in {self.root} "
                            f"or no entry in its model_index.json); {fix}")
        cls = (self.index[component] + [None, None])[1]
        if component in MODEL_CLASSES and cls != MODEL_CLASSES[component][1]:
            raise UserError(f"unsupported {component} class {cls!r} in {self.name!r}; supported: "
                            f"{MODEL_CLASSES[component][1]}")

    def check_weights(self, component: str) -> None:
        """Validate the header of every safetensors file of a component (cheap: no tensor is read); weights
        that exist only as pickles are refused."""
        from .weights import read_header, refuse_pickles
        refuse_pickles(self.root / component)
        for path in sorted((self.root / component).glob("*.safetensors")):
            read_header(path)

    def load(self, component: str, convert=None):
        """A component in fp32 (a tokenizer for tokenizer folders); with `convert` (tensor -> tensor), each weight
        of a diffusers model is passed through it as it is read (the converter halves them there, so the fp32
        weights never exist all at once)."""
        import importlib
        from .weights import refuse_pickles
        self.require(component)
        refuse_pickles(self.root / component)  # every weight loader comes here: torch2coreml, pipeline, parity
        library, name = TOKENIZER if component.startswith("tokenizer") else MODEL_CLASSES[component]
        cls = getattr(importlib.import_module(LIBRARY_MODULES.get(library, library)), name)
        folder = self.root / component
        try:
            if library == "diffusers":
                module = load_diffusers_model(cls, folder, convert)
            elif (library, name) == TOKENIZER:
                module = cls.from_pretrained(str(folder))
            else:
                module = cls.from_pretrained(str(folder), dtype=FLOAT32, use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot load {component} of {self.name!r} from {folder}: "
                            f"{first_line(exc)}") from exc
        return module.eval() if hasattr(module, "eval") else module

    load_unet = functools.partialmethod(load, "unet")
    load_text_encoder = functools.partialmethod(load, "text_encoder")
    load_text_encoder_2 = functools.partialmethod(load, "text_encoder_2")
    load_vae = functools.partialmethod(load, "vae")
    load_safety_checker = functools.partialmethod(load, "safety_checker")
    load_tokenizer = functools.partialmethod(load, "tokenizer")
    load_tokenizer_2 = functools.partialmethod(load, "tokenizer_2")

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    @property
    def says_xl(self) -> bool:
        """The folder declares an SDXL pipeline (model_index.json), whatever its components hold."""
        return self.pipeline_class.startswith("StableDiffusionXL")

    @property
    def interface(self) -> str:
        """The interface family of this model's components (python_coreml_sd.components): SDXL when its UNet
        takes SDXL's added conditions, or, without a UNet, when model_index.json names an SDXL pipeline."""
        from .components import SD, SDXL, interface_of
        if self.has("unet"):
            return interface_of(self.config("unet"))
        return SDXL if self.says_xl else SD

    @property
    def is_refiner(self) -> bool:
        """An SDXL refiner: an SDXL model without the first text encoder whose time ids end in an aesthetic
        score (model_index.json's requires_aesthetics_score)."""
        return self.says_xl and bool(self.index.get("requires_aesthetics_score")) and not self.has("text_encoder")

    def require_base(self) -> None:
        """A refiner refines another model's latents: refused, in one line, where a base model is asked for."""
        if self.is_refiner:
            raise UserError(f"model {self.name!r} is an SDXL refiner (no text_encoder, aesthetic-score time ids); pass "
                            "it as --refiner-version with the SDXL base as --model-version")

    def text_positions(self) -> int:
        """Tokens the text encoder takes (its position embeddings); CLIP's 77 when it does not say. SDXL's
        refiner has the second encoder only."""
        for folder in ("text_encoder", "text_encoder_2"):
            if self.has(folder):
                return self.config(folder).get("max_position_embeddings", CLIP_POSITIONS)
        return CLIP_POSITIONS

    def config(self, component: str, required: tuple = ()) -> dict:
        """A component's config.json without loading weights; `required` keys must be present."""
        self.require(component)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        path = self.root / component / name
        config = read_json_object(path)
        missing = [key for key in required if key not in config]
        if missing:
            raise UserError(f"{path} has no {', '.join(map(repr, missing))}; re-save the model with diffusers' "
                            "save_pretrained()")
        return config


def read_json_object(path: Path) -> dict:
    """A JSON object from a model folder, or a UserError naming the file (corrupt, binary, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; re-save the model with diffusers' save_pretrained()") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({type(exc).__name__}); re-save the model with diffusers' "
                        "save_pretrained()") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; re-save the model with "
                        "diffusers' save_pretrained()")
    return value


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = DIFFUSERS_WEIGHTS + ".index.json"  # save_pretrained's, for weights over its shard size
CLIP_POSITIONS = 77
# transformers 5 loads in the dtype a config.json names ("auto"); a model saved in fp16 (with fp16 variant
# files, as many published ones are) would come back fp16. The converters and references need fp32.
FLOAT32 = "float32"


def _safetensors_files(folder: Path):
    """The weight files of a diffusers component folder: its one safetensors file, or the shards that its
    index names (each a plain file name in the folder, as save_pretrained writes them; the index is
    untrusted input, so no path may leave the folder); None for other layouts."""
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return [folder / DIFFUSERS_WEIGHTS]
    index = folder / SHARD_INDEX
    if not index.is_file():
        return None
    weight_map = read_json_object(index).get("weight_map")
    names = set(weight_map.values()) if isinstance(weight_map, dict) and weight_map else {None}
    if not all(isinstance(n, str) and n == Path(n).name and n.endswith(".safetensors") for n in names):
        raise UserError(f"{index} has no valid weight_map (tensor -> shard file name in the same folder); "
                        "re-save the model with diffusers' save_pretrained()")
    missing = sorted(n for n in names if not (folder / n).is_file())
    if missing:
        raise UserError(f"{index} names {len(missing)} shard(s) that are missing, e.g. {missing[0]}; "
                        "download the whole folder again")
    return [folder / n for n in sorted(names)]


def load_diffusers_model(cls, folder: Path, convert=None):
    """`cls.from_pretrained(folder)` in fp32, but with the weights of a safetensors file (or of the shards
    its index names) read into memory of their own (python_coreml_sd.weights says why) and assigned to a
    model built on the meta device; `convert`, if given, then applies to each fp32 tensor as soon as it is
    read. Other layouts (.bin, variants) go through diffusers, and `convert` is not applied there."""
    import torch

    from .weights import read_safetensors

    files = _safetensors_files(folder)
    if files is None:
        return cls.from_pretrained(str(folder), use_safetensors=True)  # never a pickle
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(folder)))

    def loaded(tensor):
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        return convert(tensor) if convert else tensor

    state = {}
    for path in files:  # shard by shard: a shard's tensors are converted before the next is read
        state.update(read_safetensors(path, convert=loaded))
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer the file does not hold
        return cls.from_pretrained(str(folder), use_safetensors=True)
    return model


def resolve(model_version: str, allow_pickle: bool = False, prediction_type: str = None) -> ModelSource:
    """Turn `--model-version` into a ModelSource, or raise UserError naming the cause and the fix.
    A single checkpoint file becomes a diffusers folder in the cache (python_coreml_sd.single_file);
    `allow_pickle` lets a pickled one (.ckpt) be loaded; `prediction_type` (--prediction-type) says what its UNet
    predicts where the tensors cannot (SD 2.x base or 768-v)."""
    path = Path(model_version).expanduser()
    if path.is_file():
        from .single_file import materialize
        return ModelSource(model_version, materialize(path, allow_pickle, prediction_type))
    if prediction_type:
        raise UserError(f"--prediction-type is for single-file checkpoints; {model_version!r} is not one (a model "
                        "folder's scheduler/scheduler_config.json says what its UNet predicts)")
    entry = registry.named_model(model_version)
    explicit_path = model_version.startswith((".", "/", "~"))
    # A registry name wins over a same-named folder that holds no model (`-o tiny` for `tiny`).
    if explicit_path or (path.exists() and not (entry and not (path / "model_index.json").is_file())):
        return _from_folder(model_version, path)
    if entry and entry["source"] == "embedded":
        from .random_models import materialized_model_dir
        return ModelSource(model_version, materialized_model_dir(entry["family"], entry.get("seed", 0)))
    if "/" in model_version and model_version.count("/") == 1:
        return ModelSource(model_version, _download_from_hub(model_version))
    raise UserError(f"model {model_version!r} is neither a folder nor a known name; use a diffusers folder, "
                    f"a Hugging Face repo id, or one of: {', '.join(registry.model_names())}")


def _from_folder(name: str, path: Path) -> ModelSource:
    if not path.is_dir():
        from .single_file import SINGLE_FILE_SUFFIXES
        if path.suffix in SINGLE_FILE_SUFFIXES:
            raise UserError(f"checkpoint file {path} does not exist")
        raise UserError(f"model folder {path} does not exist; pass a diffusers folder with model_index.json")
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers model folder (no model_index.json); save the model with "
                        "StableDiffusionPipeline.save_pretrained() or pass a hub repo id")
    return ModelSource(name, path.resolve())


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        logging.getLogger(__name__).info("fetching %s from the Hugging Face hub", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as exc:  # the hub client raises many kinds: offline, auth, not found
        cause = f"{type(exc).__name__}: {first_line(exc)}"
        raise UserError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({cause}); "
                        "check the network and HF_TOKEN, or download the model and pass its folder") from exc
