"""Split a converted UNet ML Program into two packages of about equal weight size (`--chunk-unet`).

The split cuts the MIL graph of the saved package; nothing is re-traced. Chunk 1 keeps the original
inputs it uses and outputs every tensor that crosses the cut; chunk 2 takes those tensors (under the
same names) plus the original inputs it uses and produces the original outputs. The cut is chosen among
positions whose weight balance is within `BALANCE_WINDOW` of half, as the one with the fewest crossing
tensors, so the pair moves as little data between the two as the graph allows.
"""
import gc
from pathlib import Path

import numpy as np

from ..package_io import mil_program, save_mlmodel
from .common import _deployment_target, brief_program_strings, flat_inputs, log

BALANCE_WINDOW = 0.05  # accept cuts whose chunk-1 weight share is within 45%..55%


def chunk_paths(unet_package: Path) -> tuple:
    stem = str(unet_package)[: -len(".mlpackage")]
    return Path(stem + "_chunk1.mlpackage"), Path(stem + "_chunk2.mlpackage")


def program_of_package(package: Path):
    """The PyMIL Program of a saved ML Program package, plus its MLModel (for metadata)."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    return mil_program(mlmodel), mlmodel


def _is_weight(op) -> bool:
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def _weight_bytes(op) -> int:
    """Bytes of the weights an op reads directly from const/constexpr producers."""
    total = 0
    for var in flat_inputs(op):
        if var.op is not None and _is_weight(var.op):
            total += sum(np.asarray(v.val).nbytes for v in var.op.outputs if v.val is not None)
            total += sum(np.asarray(i.val).nbytes for i in var.op.inputs.values()
                         if hasattr(i, "val") and i.val is not None and var.op.op_type != "const")
    return total


def compute_ops(block) -> list:
    return [op for op in block.operations if not _is_weight(op)]


def crossing_counts(ops: list, block_outputs: list) -> np.ndarray:
    """counts[i]: how many tensors produced by ops[:i] are used by ops[i:] or are block outputs."""
    index = {id(op): i for i, op in enumerate(ops)}
    last_use = {}
    for i, op in enumerate(ops):
        for var in flat_inputs(op):
            if var.op is not None and id(var.op) in index:
                last_use[id(var)] = (index[id(var.op)], i)
    for var in block_outputs:
        if var.op is not None and id(var.op) in index:
            last_use[id(var)] = (index[id(var.op)], len(ops))
    diff = np.zeros(len(ops) + 2, dtype=np.int64)
    for produced, used in last_use.values():
        diff[produced + 1] += 1  # live at cuts produced+1 .. used
        diff[used + 1] -= 1
    return np.cumsum(diff)[: len(ops) + 1]


def choose_cut(block) -> int:
    """Index into compute_ops(block): chunk 1 runs ops[:cut]."""
    ops = compute_ops(block)
    weights = np.array([_weight_bytes(op) for op in ops], dtype=np.float64)
    share = np.concatenate([[0.0], np.cumsum(weights)]) / max(weights.sum(), 1.0)
    counts = crossing_counts(ops, list(block.outputs))
    candidates = [i for i in range(1, len(ops)) if abs(share[i] - 0.5) <= BALANCE_WINDOW]
    if not candidates:  # one op holds most weights: take the most balanced cut
        return int(np.argmin(np.abs(share[1:-1] - 0.5))) + 1
    return min(candidates, key=lambda i: (counts[i], abs(share[i] - 0.5)))


def _is_input_cast(op, func) -> bool:
    """A cast of a function input: chunk 2 recomputes it from the original input instead of taking the
    cast tensor, so that it keeps e.g. the fp32 `encoder_hidden_states` interface."""
    inputs = {id(v) for v in func.inputs.values()}
    return op.op_type == "cast" and id(op.inputs["x"]) in inputs


def crossing_vars(block, cut: int) -> list:
    ops = compute_ops(block)
    first = {id(op) for op in ops[:cut] if not _is_input_cast(op, block)}
    seen, result = set(), []
    for op in ops[cut:]:
        for var in flat_inputs(op):
            if var.op is not None and id(var.op) in first and id(var) not in seen:
                seen.add(id(var))
                result.append(var)
    return result


def _drop_unused_inputs(func) -> None:
    used = {id(v) for op in func.operations for v in flat_inputs(op)} | {id(v) for v in func.outputs}
    for name in [n for n, v in func.inputs.items() if id(v) not in used]:
        del func._input_dict[name]


def _eliminate_dead_code(prog) -> None:
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    PASS_REGISTRY["common::dead_code_elimination"](prog)


def make_first_chunk(prog, cut: int) -> list:
    """Cut prog in place to ops[:cut] with the crossing tensors as outputs; returns their names."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    func = prog.functions["main"]
    ops = compute_ops(func)
    outputs = []
    with func:
        # fp16 tensors cross the cut as fp32, as in Apple's chunks (its chunk_mlprogram / coremltools'
        # bisect_model): cast to fp32 under the tensor's own name, the fp16 original renamed.
        for var in crossing_vars(func, cut):
            if var.dtype == types.fp16:
                name = var.name
                var.set_name(name + "_fp16")
                var = mb.cast(x=var, dtype="fp32", name=name)
            outputs.append(var)
    func.set_outputs(outputs)
    func.remove_ops(list(reversed(ops[cut:])))
    _eliminate_dead_code(prog)
    _drop_unused_inputs(func)
    func.output_types = None
    return [v.name for v in outputs]


def make_second_chunk(prog, cut: int) -> list:
    """Cut prog in place to ops[cut:], the crossing tensors becoming inputs of the same names."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Placeholder, types

    func = prog.functions["main"]
    ops = compute_ops(func)
    names = []
    for var in crossing_vars(func, cut):
        fp16 = var.dtype == types.fp16
        placeholder = Placeholder(var.shape, dtype=types.fp32 if fp16 else var.dtype, name=var.name)
        func._input_dict[var.name] = placeholder.outputs[0]
        new_var = placeholder.outputs[0]
        if fp16:  # fp32 across the cut (see make_first_chunk), back to fp16 before its first use
            with func:
                new_var = mb.cast(x=new_var, dtype="fp16", name=var.name + "_fp16", before_op=ops[cut])
        # force_replace: the check that guards constexpr (palettized) weights upstream of old_var does
        # not apply, since everything before the cut is removed below.
        func.replace_uses_of_var_after_op(anchor_op=None, old_var=var, new_var=new_var,
                                          no_check_var_types=True, force_replace=True)
        names.append(var.name)
    func.remove_ops([op for op in reversed(ops[:cut]) if not _is_input_cast(op, func)])
    _eliminate_dead_code(prog)
    _drop_unused_inputs(func)
    return names


def program_to_mlmodel(prog, min_deployment_target: str):
    import coremltools as ct
    import warnings
    # FLOAT32 here only means "no further fp16 casting": the program is already in its final precision.
    # A cut program of enumerated shapes gets coremltools' placeholder ranges, which declare_shapes replaces.
    with brief_program_strings(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some dimensions in the input shape are unknown")
        return ct.convert(prog, convert_to="mlprogram", source="milinternal", compute_precision=ct.precision.FLOAT32,
                          minimum_deployment_target=_deployment_target(min_deployment_target),
                          pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)


def _copy_description(source, mlmodel, chunk: int, crossing: list) -> None:
    for attr in ("short_description", "author", "license", "version"):
        setattr(mlmodel, attr, getattr(source, attr))
    for name in list(mlmodel.input_description) + list(mlmodel.output_description):
        if name in crossing:
            text = f"Intermediate UNet tensor passed from chunk 1 to chunk 2 ({name})"
        else:
            text = source.input_description[name] if name in source.input_description \
                else source.output_description[name]
        target = mlmodel.input_description if name in mlmodel.input_description else mlmodel.output_description
        target[name] = text
    meta = mlmodel.user_defined_metadata
    meta.update(source.user_defined_metadata)
    meta["com.python_coreml_sd.component"] = f"{meta.get('com.python_coreml_sd.component', 'unet')}_chunk{chunk}"
    meta["com.python_coreml_sd.chunk"] = f"{chunk}/2"


def package_variants(mlmodel) -> list:
    """[{input name: shape}] per shape a package takes: its enumerated shapes index by index (the component
    table's Dims.variants, pinned in that order), fixed inputs the same in each; one entry without enumerated ones."""
    inputs = mlmodel.get_spec().description.input
    lists = {f.name: [tuple(e.shape) for e in f.type.multiArrayType.enumeratedShapes.shapes] for f in inputs
             if f.type.multiArrayType.WhichOneof("ShapeFlexibility") == "enumeratedShapes"}
    count = max((len(v) for v in lists.values()), default=1)
    return [{f.name: lists[f.name][i] if f.name in lists else tuple(f.type.multiArrayType.shape) for f in inputs}
            for i in range(count)]


def declare_shapes(mlmodel, variants: list) -> None:
    """Each input of a chunk as its shapes in `variants` ({name: shape} each) say: fixed when one, else Core ML
    enumerated shapes in variant order (paired index by index across inputs, as the whole UNet's), the first the
    default. Cutting a program of enumerated shapes leaves coremltools' ranges, which pair nothing."""
    for feature in mlmodel._spec.description.input:
        shapes = [variant[feature.name] for variant in variants]
        array = feature.type.multiArrayType
        array.ClearField("ShapeFlexibility")
        del array.shape[:]
        array.shape.extend(shapes[0])
        if len(set(shapes)) > 1:
            for shape in shapes:
                array.enumeratedShapes.shapes.add().shape.extend(shape)


def crossing_shapes(first_chunk: Path, variants: list) -> list:
    """[{crossing tensor: shape}] of chunk 1's outputs at each variant of its inputs, by the MIL type inference
    of the program specialized to those shapes (no weights are run)."""
    from ..runtime.mil.model import load_program
    shapes = []
    for variant in variants:
        _, function = load_program(first_chunk, input_shapes=variant)
        shapes.append({var.name: tuple(int(d) for d in var.shape) for var in function.outputs})
    return shapes


def _write_chunk(package: Path, dest: Path, chunk: int, cut: int, options, variants: list = None) -> list:
    """One chunk; `variants`: the shapes of its inputs in each shape the whole takes (None: one shape)."""
    prog, source = program_of_package(package)
    crossing = (make_first_chunk if chunk == 1 else make_second_chunk)(prog, cut)
    mlmodel = program_to_mlmodel(prog, options.min_deployment_target)
    del prog
    _copy_description(source, mlmodel, chunk, crossing)
    if variants is not None:
        names = {f.name for f in mlmodel._spec.description.input}
        declare_shapes(mlmodel, [{k: v for k, v in variant.items() if k in names} for variant in variants])
    save_mlmodel(mlmodel, dest, overwrite=True)
    return crossing


def chunk_mlpackage(package: Path, options) -> list:
    """Write `<package>_chunk1/2.mlpackage` beside `package`; returns their paths.

    Each chunk is built from a fresh load of the package so that only one program's weights are in
    memory at a time.
    """
    package = Path(package)
    prog, whole = program_of_package(package)
    cut = choose_cut(prog.functions["main"])
    variants = package_variants(whole)
    flexible = len(variants) > 1  # chunk 2 then takes chunk 1's outputs at the shapes each variant gives them
    del prog, whole
    gc.collect()
    paths = chunk_paths(package)
    _write_chunk(package, paths[0], 1, cut, options, variants if flexible else None)
    gc.collect()
    if flexible:
        variants = [{**variant, **crossing} for variant, crossing in zip(variants, crossing_shapes(paths[0], variants))]
    crossing = _write_chunk(package, paths[1], 2, cut, options, variants if flexible else None)
    gc.collect()
    log.info("unet: split into %s and %s; %d tensors cross the cut", paths[0].name, paths[1].name, len(crossing))
    return list(paths)
