"""ControlNets as users name them (`--convert-controlnet MODEL`, `--controlnet NAME`): a diffusers
ControlNetModel folder or a registry name (the embedded `tiny-controlnet`), and the check that one fits the
UNet it is to control."""
from dataclasses import dataclass
from pathlib import Path

from . import registry
from .errors import UserError, first_line
from .model_sources import load_diffusers_model, read_json_object

# What a ControlNet shares with the UNet it controls: the shapes of its residuals and of its text input.
MATCHING_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
# SDXL's: the added conditions' widths too (time ids, pooled text embeddings)
XL_MATCHING_KEYS = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")


@dataclass(frozen=True)
class ControlNetSource:
    name: str  # what the user passed; names the package (Apple's ControlNet_<name>.mlpackage)
    root: Path  # the diffusers folder: config.json and the weights

    def config(self) -> dict:
        return read_json_object(self.root / "config.json")

    def load(self):
        from diffusers import ControlNetModel
        from .weights import refuse_pickles
        refuse_pickles(self.root)
        try:
            return load_diffusers_model(ControlNetModel, self.root).eval()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot load ControlNet {self.name!r} from {self.root}: {first_line(exc)}") from exc

    def check_fits(self, unet_config: dict, model: str) -> None:
        """A UserError unless this is a ControlNetModel made for a UNet of this architecture (SDXL's for SDXL's)."""
        config = self.config()
        if config.get("_class_name") != "ControlNetModel":
            raise UserError(f"{self.root} holds a {config.get('_class_name')!r}, not a diffusers ControlNetModel")
        xl = [c.get("addition_embed_type") == "text_time" for c in (config, unet_config)]
        if xl[0] != xl[1]:
            raise UserError(f"ControlNet {self.name!r} is for another model family: it is {'' if xl[0] else 'not '}"
                            f"SDXL's and model {model!r} is {'' if xl[1] else 'not '}SDXL's; use a ControlNet made for "
                            "that model")
        for key in MATCHING_KEYS + (XL_MATCHING_KEYS if xl[0] else ()):
            theirs, ours = config.get(key), unet_config.get(key)
            if key in unet_config and theirs is not None and list(_seq(theirs)) != list(_seq(ours)):
                raise UserError(f"ControlNet {self.name!r} is for another model family: its {key} {theirs!r} is not "
                                f"the {ours!r} of {model!r}'s UNet; use a ControlNet made for that model")


def controlnet_names(value) -> tuple:
    """The ControlNets a generation runs, in order, from None, one name or several (diffusers'
    MultiControlNetModel: their residuals, each scaled, are summed)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, Path)) else tuple(value)


def _seq(value):
    return value if isinstance(value, (list, tuple)) else [value]


def resolve_controlnet(name: str) -> ControlNetSource:
    """`name` -> a ControlNet folder, or a UserError naming the fix."""
    path = Path(name).expanduser()
    entry = registry.named_controlnet(name)
    if entry and not path.exists():
        from .random_models import materialized_controlnet_dir
        return ControlNetSource(name, materialized_controlnet_dir(name))
    if not (path / "config.json").is_file():
        known = ", ".join(registry.controlnet_names())
        raise UserError(f"ControlNet {name!r} is not a diffusers ControlNetModel folder (config.json and weights) "
                        f"nor a known name ({known})")
    return ControlNetSource(name, path.resolve())
