"""Trace + convert small PyTorch modules to .mlpackage files for runtime tests."""
import numpy as np
import torch

PRECISIONS = ("fp32", "fp16")


def convert(module, example_inputs, names, path, precision="fp32", target="macOS13", **kwargs):
    """Saves an ML Program converted from `module` at `path`; returns the path."""
    import coremltools as ct

    module = module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, example_inputs, check_trace=False)
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=_np_dtype(x)) for n, x in zip(names, example_inputs)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, target),
        **kwargs,
    )
    model.save(str(path))
    return path


def _np_dtype(x):
    return np.int32 if x.dtype in (torch.int32, torch.int64) else np.float32


def reference(module, example_inputs):
    with torch.no_grad():
        out = module.eval()(*example_inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in outs]


def numpy_inputs(names, example_inputs):
    return {n: x.numpy().astype(_np_dtype(x)) for n, x in zip(names, example_inputs)}
