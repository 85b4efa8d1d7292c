"""Helpers for runtime tests: convert small PyTorch modules or MIL programs to .mlpackage files."""
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


def run_mil(build, inputs, tmp_path, target="iOS17"):
    """Build a one-function MIL program with `build(**placeholders)`, save it as an .mlpackage
    (no optimisation passes, so the ops under test stay as written), run it with MILModel.

    inputs: {name: numpy array}; the placeholder dtype follows the array (fp16, fp32, int32, bool).
    Returns the list of output arrays, in the program's output order.
    """
    from python_coreml_sd.runtime.mil import MILModel

    shapes = {n: (a.shape, a.dtype) for n, a in inputs.items()}
    return list(MILModel(mil_package(build, shapes, tmp_path, target)).predict(inputs).values())


def mil_package(build, shapes, tmp_path, target="iOS17", ct_inputs=None):
    """Path of a saved .mlpackage of `build(**placeholders)`; shapes: {name: (shape, numpy dtype)}
    (a shape may hold PyMIL symbols, then ct_inputs give coremltools' flexible input types)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Function, Placeholder, Program

    placeholders = {n: Placeholder(shape, dtype=_mil_type(dt)) for n, (shape, dt) in shapes.items()}
    with Function(placeholders, opset_version=getattr(ct.target, target)) as func:
        outs = build(**func.inputs)
        func.set_outputs(list(outs) if isinstance(outs, (tuple, list)) else [outs])
    prog = Program()
    prog.add_function("main", func)

    path = tmp_path / f"op_{len(list(tmp_path.iterdir()))}.mlpackage"
    model = ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY, inputs=ct_inputs,
                       minimum_deployment_target=getattr(ct.target, target))
    model.save(str(path))
    return path


def _mil_type(dtype):
    from coremltools.converters.mil.mil import types

    return {np.dtype(np.float16): types.fp16, np.dtype(np.float32): types.fp32,
            np.dtype(np.int32): types.int32, np.dtype(np.bool_): types.bool}[np.dtype(dtype)]
