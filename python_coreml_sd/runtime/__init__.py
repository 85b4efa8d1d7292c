"""Model execution backends: Core ML itself (macOS) and the MIL-on-PyTorch runtime (anywhere)."""
import platform

from ..errors import UserError

# What runs a converted .mlpackage (load_model's `backend`): Core ML itself, or our MIL runtime.
RUNTIME_BACKENDS = ("coreml", "mil")


def default_backend() -> str:
    """Core ML where it exists (macOS), our MIL runtime everywhere else."""
    return "coreml" if platform.system() == "Darwin" else "mil"


def load_model(path, backend="mil", device="cpu", compute_unit="ALL", **mil_options):
    """A model with `predict({name: array}) -> {name: array}`.

    backend "coreml": coremltools.models.MLModel (macOS only), compute_unit one of
    coremltools.ComputeUnit's names. backend "mil": MILModel on `device` ("cpu" or "cuda");
    mil_options go to MILModel (cuda_graph=True pays off for repeated calls such as UNet steps).
    """
    if backend == "mil":
        from .mil import MILModel
        return MILModel(path, device=device, **mil_options)
    if backend == "coreml":
        return _load_coreml(path, compute_unit)
    raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIME_BACKENDS)}")


def _load_coreml(path, compute_unit):
    if platform.system() != "Darwin":
        raise UserError(f"backend 'coreml' needs macOS (Core ML runs only on Apple systems); this is "
                        f"{platform.system()}: use backend 'mil'")
    import coremltools as ct

    from ..package_check import check_package
    check_package(path)  # Core ML follows Manifest.json paths as they are
    try:
        unit = ct.ComputeUnit[compute_unit]
    except KeyError:
        names = ", ".join(u.name for u in ct.ComputeUnit)
        raise UserError(f"unknown compute unit {compute_unit!r}; choose one of {names}") from None
    return ct.models.MLModel(str(path), compute_units=unit)
