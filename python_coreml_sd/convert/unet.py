"""UNet -> Core ML (ML Program) through the Neural-Engine-friendly UNet of `layers.unet`.

Inputs `sample` (B, 4, H, W), `timestep` (B,), `encoder_hidden_states` (B, C, 1, S); output
`noise_pred`. B is 2 (classifier-free guidance: unconditional and conditional in one call) unless
options.unet_batch_one.

Memory and time (see docs/unet.md): the graph is traced at batch 1 with stand-in weights before any
real weight is loaded; the weights then exist once in PyTorch (read into private memory, for fp16
packages halved one by one as they are read, shared by the diffusers and Neural-Engine modules, set
into the traced module by name); the MIL program is built
with no passes, the PyTorch side is freed, and only then do a trimmed pass pipeline and the streaming
fp16 cast run, freeing each fp32 weight as its fp16 copy is made.
"""
import gc
import os
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from unittest import mock

import numpy as np
import torch

from ..components import (RESIDUAL, SDXL, TABLE, Dims, controlled_dims, example_time_ids, inpainting_channels,
                          interface_of, text_pooled_width, unet_dims, with_residuals)
from ..errors import UserError
from ..layers.attention import DEFAULT_QUERY_CHUNK
from ..layers.unet import (ControlledUNetANE, DiffusersControlledUNet, DiffusersUNet, UNet2DConditionModelANE,
                           check_supported, from_diffusers, query_chunk_plan)
from .options import IOS18_TARGETS, format_sizes
from .common import (_deployment_target, brief_program_strings, check_correctness, describe, flat, flat_inputs,
                     fresh_op_names, kept_existing, log, output_path, run_passes, save_converted, tensor_types, trace)

DESCRIPTIONS = {
    "sample": "Noisy latents being denoised, (B, 4, latent height, latent width); an inpainting UNet's (B, 9, ...): "
              "the latents, the mask (1: repaint) and the masked image's latents, concatenated on channels",
    "timestep": "The scheduler's current timestep, one value per batch entry",
    "encoder_hidden_states": "Text embeddings from the text encoder in (B, C, 1, S) layout: batch entry 0 is the "
                             "negative/unconditional prompt, 1 the prompt (S tokens; longer prompts are truncated)",
    "noise_pred": "The model's prediction (noise, or v for v-prediction models), shaped like `sample`",
    "time_ids": "SDXL's micro-conditioning per batch entry: original size (h, w), crop top-left (y, x), target size "
                "(h, w) in pixels; the refiner's: original size, crop top-left, aesthetic score",
    "text_embeds": "Pooled text embeddings of text_encoder_2 (text_embeds), per batch entry",
}
RESIDUAL_DESCRIPTION = "A ControlNet's residual (its output of the same name), added to the UNet's state there"
OUTPUT_NAMES = list(TABLE["unet"].outputs)

# The default pipeline minus passes that cannot fire on this graph (quantization, loops, images, padding,
# batchnorm/prelu/relu fusions) and minus const_deduplication, which hashes every weight three times for
# a UNet that shares none. add_fp16_cast edits the op list in place, which costs time quadratic in the
# number of ops: dead-code elimination right before it halves the ops it walks (10x faster on a UNet).
UNET_PASSES = [
    "common::lower_complex_dialect_ops", "common::update_output_dtypes", "common::cast_optimization",
    "common::noop_elimination", "common::const_elimination", "common::dead_code_elimination",
    "common::sanitize_input_output_names",
    "common::divide_to_multiply", "common::select_optimization", "common::remove_symbolic_reshape",
    "common::noop_elimination", "common::fuse_gelu_exact", "common::fuse_squeeze_expand_dims",
    "common::fuse_conv_bias", "common::fuse_layernorm_or_instancenorm", "common::fuse_reduce_mean",
    "common::merge_consecutive_reshapes", "common::merge_consecutive_transposes", "common::reduce_transposes",
    "common::remove_redundant_ops", "common::dedup_op_and_var_names", "common::dead_code_elimination",
    "common::add_fp16_cast", "common::update_output_dtypes", "common::const_elimination",
    "common::dead_code_elimination", "common::cast_optimization", "common::const_elimination",
    "common::dead_code_elimination", "common::noop_elimination", "common::dedup_op_and_var_names",
    "common::topological_reorder", "common::dead_code_elimination",
]


CONFIG_KEYS = ("sample_size", "cross_attention_dim", "block_out_channels", "down_block_types", "up_block_types")


def check_options(source, options, component: str = "unet") -> None:
    """Before any conversion: each latent size must pass through every downsampling of this UNet, the shapes
    must suit the attention and chunking asked for."""
    config = source.config("unet", CONFIG_KEYS)
    check_channels(config)
    if component == "control-unet":
        check_controlled_sizes(options)
    step = 2 ** (len(config["block_out_channels"]) - 1)
    for size in options.sizes_or(config["sample_size"]):
        flags = [f"--latent-sizes {size[0]}x{size[1]}: {v}" for v in size] if options.latent_sizes else \
            [f"{flag} {v}" for flag, v in zip(("--latent-h", "--latent-w"), size)]
        for flag, value in zip(flags, size):
            if value % step:
                nearest = " or ".join(str(v) for v in (value - value % step, value - value % step + step) if v > 0)
                raise UserError(f"{flag} is not a multiple of {step}, which this UNet's {step}x downsampling needs; "
                                f"use {nearest}")
    check_flexible(options, config)


def check_channels(config: dict) -> None:
    """A UNet's `sample` is its latents or an inpainting UNet's latents, mask and masked-image latents."""
    latent = config.get("out_channels", 4)
    if config.get("in_channels", 4) not in (latent, inpainting_channels(latent)):
        raise UserError(f"this UNet takes {config.get('in_channels')} input channels for {latent} latent channels; "
                        f"supported: {latent} (text-to-image) or {inpainting_channels(latent)} (inpainting)")


def check_controlled_sizes(options) -> None:
    """The controlled UNet and the ControlNet take a residual per block, each sized by the latent size: several
    sizes enumerate many inputs together, which Core ML allows from iOS 18."""
    if len(options.latent_sizes) > 1 and options.min_deployment_target not in IOS18_TARGETS:
        raise UserError("--latent-sizes with several sizes and ControlNets (--unet-support-controlnet, "
                        "--convert-controlnet) need --min-deployment-target iOS18 or macOS15: the residuals' shapes "
                        "follow the latent size, and before iOS 18 Core ML enumerates the shapes of one input only")


def check_flexible(options, config: dict) -> None:
    """What enumerated shapes cannot be combined with."""
    query_chunks(config, options)  # SPLIT_EINSUM_V2: sizes that share no chunking are refused here
    if options.flexible and options.chunk_unet and options.min_deployment_target not in IOS18_TARGETS:
        raise UserError("--chunk-unet with several shapes needs --min-deployment-target iOS18 or macOS15: the second "
                        "chunk takes several tensors whose shapes follow the shape chosen, and before iOS 18 Core ML "
                        "enumerates the shapes of one input only")


def query_chunks(config: dict, options) -> dict:
    """SPLIT_EINSUM_V2 at several latent sizes: {query sequence length at the default size: number of equal
    chunks} for every attention level (`layers.unet.query_chunk_plan`), so that one program cuts every size alike;
    None otherwise (one size keeps chunks of DEFAULT_QUERY_CHUNK queries, its package as before)."""
    sizes = options.sizes_or(config["sample_size"])
    if options.attention_implementation != "SPLIT_EINSUM_V2" or len(sizes) < 2:
        return None
    plan = query_chunk_plan(config, sizes)
    for level, (_, count) in plan.items():
        if count is None:
            lengths = ", ".join(f"{h}x{w}: {(h >> level) * (w >> level)}" for h, w in sizes)
            raise UserError(f"--latent-sizes {format_sizes(sizes)} with SPLIT_EINSUM_V2: the attention "
                            f"at 1/{2 ** level} of the latent has {lengths} queries, which no one number of equal chunks "
                            f"of at most {DEFAULT_QUERY_CHUNK} divides; use sides that are multiples of a higher power "
                            "of 2, or --attention-implementation SPLIT_EINSUM")
    return {length: count for length, count in plan.values()}


def latent_size(config: dict, options) -> tuple:
    """The default latent size (the first of --latent-sizes)."""
    return options.sizes_or(config["sample_size"])[0]


def text_sequence_length(source, options) -> int:
    return options.text_token_sequence_length or source.text_positions()


def sample_inputs(config: dict, batch: int, h: int, w: int, seq_len: int,
                  text_pooled: int = None) -> "OrderedDict[str, torch.Tensor]":
    """Example inputs; an SDXL UNet's also need the width of the pooled text embeddings (text_encoder_2's)."""
    generator = torch.Generator().manual_seed(0)
    family = interface_of(config)  # the shapes as the table gives them
    shapes = TABLE["unet"].input_shapes(unet_dims(config, batch, h, w, seq_len, text_pooled), family)
    inputs = OrderedDict(
        sample=torch.randn(*shapes["sample"], generator=generator),
        timestep=torch.tensor([999.0, 10.0][:batch] if batch <= 2 else [500.0] * batch),
        encoder_hidden_states=torch.randn(*shapes["encoder_hidden_states"], generator=generator),
    )
    if family == SDXL:  # the added conditions
        inputs["time_ids"] = torch.tensor([example_time_ids(h, w, shapes["time_ids"][1])] * batch)
        inputs["text_embeds"] = torch.randn(*shapes["text_embeds"], generator=generator)
    return inputs


def example_dims(config: dict, inputs: dict, dims_of=unet_dims) -> Dims:
    """The Dims of the example `inputs` (`sample_inputs`); `dims_of`: `components.controlled_dims` for the
    ControlNet residuals of their size too."""
    batch, _, h, w = inputs["sample"].shape
    pooled = inputs["text_embeds"].shape[-1] if "text_embeds" in inputs else None
    return dims_of(config, batch, h, w, inputs["encoder_hidden_states"].shape[-1], pooled)


def enumerated_shapes(config: dict, inputs: dict, options, component: str = "unet") -> dict:
    """The inputs' enumerated shapes of `component` (a UNet, or the ControlNet steering one; components.Dims.variants):
    every --latent-sizes size by every context of 1..--max-prompt-chunks windows; {} for one shape. `inputs`: the
    default shape's example."""
    variants = example_dims(config, inputs).variants(options.sizes_or(config["sample_size"]), options.max_prompt_chunks)
    if controlled(inputs):  # each size its own residuals
        variants = with_residuals(variants, config)
    return TABLE[component].enumerated_shapes(variants, interface_of(config))


def residual_inputs(config: dict, inputs: dict) -> "OrderedDict[str, torch.Tensor]":
    """Example ControlNet residuals for the controlled UNet (SD's or SDXL's) taking the example `inputs`
    (`sample_inputs`), as the table names and shapes them."""
    generator = torch.Generator().manual_seed(1)
    shapes = TABLE["control-unet"].input_shapes(example_dims(config, inputs, controlled_dims), interface_of(config))
    return OrderedDict((name, 0.5 * torch.randn(*shape, generator=generator))
                       for name, shape in shapes.items() if name not in inputs)


def controlled(inputs: dict) -> bool:
    """The inputs carry a ControlNet's residuals: the controlled UNet's."""
    return RESIDUAL.format(0) in inputs


def diffusers_reference(unet, inputs: dict) -> np.ndarray:
    """noise_pred of the diffusers UNet for the converted UNet's inputs, in their order (DiffusersUNet, or
    DiffusersControlledUNet for the controlled UNet's)."""
    with torch.no_grad():
        return (DiffusersControlledUNet if controlled(inputs) else DiffusersUNet)(unet)(*inputs.values()).numpy()


def unet_passes(compute_precision: str) -> list:
    _register_streaming_fp16_pass()
    fp16 = {"common::add_fp16_cast": [STREAMING_FP16_PASS] if compute_precision == "float16" else []}
    return [name for p in UNET_PASSES for name in fp16.get(p, [p])]


def traced_to_mlprogram(holder: dict, inputs: dict, options, enumerated: dict = None):
    """ct.convert with no passes, our passes, then ct.convert to the package with no passes again:
    PyTorch's copy of the weights goes before the MIL passes and the fp16 cast allocate theirs.

    `holder["traced"]` must be the only reference to the traced module: it is popped here. The MIL consts
    are views of the module's tensors, so each fp32 weight is freed as the streaming fp16 cast replaces it
    (a caller still holding the module would keep every fp32 weight alive until the end: +1.7 GB on SD 1.5).
    """
    import coremltools as ct
    fresh_op_names()
    target = _deployment_target(options.min_deployment_target)
    traced = holder.pop("traced")
    with brief_program_strings():
        with half_weights_as_constexpr(traced):
            prog = ct.convert(traced, convert_to="milinternal", source="pytorch",
                              inputs=tensor_types(inputs, options, enumerated),
                              outputs=[ct.TensorType(name=n, dtype=np.float32) for n in OUTPUT_NAMES],
                              compute_precision=ct.precision.FLOAT32, minimum_deployment_target=target,
                              pass_pipeline=ct.PassPipeline.EMPTY)
        del traced  # the program's consts now hold the only references to the weights
        release_free_memory()
        log_memory("MIL program built, PyTorch released")
        run_passes(prog, unet_passes(options.compute_precision))
        log_memory("passes run")
        # FLOAT32 only means "no further fp16 casting": the passes above gave the program its precision.
        return ct.convert(prog, convert_to="mlprogram", source="milinternal", compute_precision=ct.precision.FLOAT32,
                          minimum_deployment_target=target, pass_pipeline=ct.PassPipeline.EMPTY,
                          skip_model_load=True)


def unet_output_paths(options, component: str = "unet") -> list:
    from .chunk import chunk_paths
    out = output_path(options, component)
    # The unchunked package stays beside the chunks: macOS apps load it, iOS apps the chunks.
    return [out, *chunk_paths(out)] if options.chunk_unet else [out]


def convert_unet(source, options, component: str = "unet") -> list:
    outputs = unet_output_paths(options, component)
    if kept_existing(outputs, options, component):
        return outputs
    config = source.config("unet", CONFIG_KEYS)
    check_supported(config)
    batch = 1 if options.unet_batch_one else 2
    inputs = sample_inputs(config, batch, *latent_size(config, options), text_sequence_length(source, options),
                           text_pooled_width(source))
    if component == "control-unet":
        inputs.update(residual_inputs(config, inputs))
    enumerated = enumerated_shapes(config, inputs, options, component)
    mlmodel, reference = build_mlprogram(source.load_unet, inputs, options, config, component, enumerated)
    out = save_converted(mlmodel, options, component, enumerated)
    del mlmodel
    if options.check_output_correctness:
        check_correctness({"noise_pred": reference}, out, _as_numpy(inputs), options.psnr_threshold)
    if not options.chunk_unet:
        return [out]
    from .chunk import chunk_mlpackage
    return [out, *chunk_mlpackage(out, options)]


# SDXL's refiner UNet (`source`: the --refiner-version model), <model>_refiner.mlpackage; --unet-support-controlnet:
# the UNet taking a ControlNet's residuals, <model>_control-unet.mlpackage (Resources: ControlledUnet)
convert_refiner = partial(convert_unet, component="refiner")
convert_controlled_unet = partial(convert_unet, component="control-unet")


def check_recipe(source, options) -> None:
    """UserError, before any conversion, if the mixed-bit recipe names a layer this UNet lacks: the
    Neural-Engine UNet (built on the meta device, no weights) has the diffusers UNet's module paths,
    and its MIL weights are named after them for every attention implementation."""
    from ..compression.recipes import check_layer_names, load_recipe

    config = source.config("unet")
    check_supported(config)
    with torch.device("meta"):
        model = UNet2DConditionModelANE(dict(config), options.attention_implementation)
    check_layer_names(load_recipe(options.mixed_bit_recipe), model, f"the UNet of {source.name!r}")


def build_mlprogram(load_unet, inputs: dict, options, config: dict, component: str = "unet", enumerated: dict = None):
    """Trace, convert (`enumerated`: the inputs' enumerated shapes) and describe; returns (MLModel, diffusers
    reference output or None).

    The graph is traced before any weight is loaded (`traced_skeleton`), so the trace's forward pass
    and the weights are never in memory together. `load_unet(convert)` returns the diffusers UNet; taking a
    loader rather than the module lets this function hold the only reference, so that the module's
    memory can go once its weights are in MIL. A loader may pass each weight through `convert` (None or
    `halve_if_large`) as it reads it, so that an fp16 conversion never holds all weights in fp32
    (ModelSource.load_unet does), or ignore it: the weights are halved here again, which changes nothing.
    The reference output needs the fp32 UNet, so it gets no `convert`.
    """
    holder = {"traced": traced_skeleton(config, options.attention_implementation, inputs, query_chunks(config, options))}
    release_free_memory()
    log_memory("traced with stand-in weights")
    halve = options.compute_precision == "float16"
    unet = load_unet(halve_if_large if halve and not options.check_output_correctness else None)
    reference = diffusers_reference(unet, inputs) if options.check_output_correctness else None
    weights = from_diffusers(unet, options.attention_implementation).state_dict()  # the controlled UNet's too
    del unet
    gc.collect()  # modules may hold reference cycles: now `weights` holds the only reference to each tensor
    if halve:
        halve_large_weights(weights)
    assign_weights(holder["traced"], weights)
    del weights  # the traced module now holds the only reference
    log_memory("weights loaded")
    mlmodel = traced_to_mlprogram(holder, inputs, options, enumerated)
    log_memory("converted")
    describe(mlmodel, options, component, {**{k: v for k, v in DESCRIPTIONS.items() if k in inputs or k in OUTPUT_NAMES},
                                           **{k: RESIDUAL_DESCRIPTION for k in inputs if k.startswith(RESIDUAL.format(""))}})
    meta = mlmodel.user_defined_metadata
    meta["com.python_coreml_sd.batch_size"] = str(inputs["sample"].shape[0])
    meta["com.python_coreml_sd.latent_size"] = "x".join(map(str, inputs["sample"].shape[2:]))
    return mlmodel, reference


def traced_skeleton(config: dict, attention_implementation: str, inputs: dict, chunks: dict = None):
    """The Neural-Engine UNet traced with stand-in weights (one zero per tensor, expanded to its shape):
    the graph depends on shapes only, and the weights are module attributes that `assign_weights` sets.
    The trace's forward pass runs on `trace_inputs`, smaller than the real ones. `chunks`: `query_chunks`."""
    with torch.device("meta"):
        model = (ControlledUNetANE if controlled(inputs) else UNet2DConditionModelANE)(
            dict(config), attention_implementation, query_chunks=chunks)
    stand_ins = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(stand_ins, strict=True, assign=True)
    return trace(model.requires_grad_(False), trace_inputs(config, attention_implementation, inputs))


def trace_inputs(config: dict, attention_implementation: str, inputs: dict) -> tuple:
    """Inputs for tracing: batch 1, and for ORIGINAL and SPLIT_EINSUM a small latent too.

    Batch and latent sizes reach those graphs only as traced size ops (no shape-dependent Python
    control flow), and ct.convert declares the real shapes; the full-size forward pass would be
    most of the trace's time (8 of 18 s on SD 1.5). SPLIT_EINSUM_V2 chooses its query chunks from the
    sequence length in Python, so it is traced at the real latent size."""
    values = [value[:1] for value in inputs.values()]
    if attention_implementation != "SPLIT_EINSUM_V2":
        small = 2 * 2 ** (len(config["block_out_channels"]) - 1)  # each level at least 2x2
        h, w = values[0].shape[2:]
        # the sample and a controlled UNet's residuals, each cropped by the same factor
        values = [v[:, :, :v.shape[2] * small // h, :v.shape[3] * small // w] if k == "sample" or k.startswith(
            RESIDUAL.format("")) else v for k, v in zip(inputs, values)]
    return tuple(values)


def halve_large_weights(weights: dict) -> None:
    """Each large fp32 weight -> fp16, in place and one at a time, so the fp32 copy goes as its fp16 one
    comes: an fp16 package's weights are rounded exactly so by the fp16 pass, and the MIL program then
    never holds them in fp32 (`half_weights_as_constexpr`). A weight beyond fp16's range stays fp32,
    for the fp16 pass to judge as coremltools' does."""
    for name in weights:
        weights[name] = halve_if_large(weights[name])


def halve_if_large(value: torch.Tensor) -> torch.Tensor:
    """One weight as `halve_large_weights` leaves it: an fp32 tensor of LARGE_WEIGHT_ELEMENTS values or more,
    all within fp16's range, as fp16; anything else unchanged."""
    large = value.dtype == torch.float32 and value.numel() >= LARGE_WEIGHT_ELEMENTS
    return value.half() if large and not _exceeds_fp16(value.numpy()) else value


def half_weights_as_constexpr(traced):
    """While `traced` converts from PyTorch, an fp16 weight becomes `constexpr_cast(fp16 -> fp32)`
    instead of an fp16 const: the program stays fp32 as coremltools' passes expect, with half the
    memory, and const_elimination leaves constexpr ops alone. The fp16 pass below turns each back into
    an fp16 const. coremltools has no option for this, hence the patch of its torch frontend's const
    maker; without that method (another coremltools) the weights go back to fp32 first (correct, with
    the fp32 memory), since fp16 consts would meet fp32 activations."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.converter import TorchConverter

    original = getattr(TorchConverter, "_add_const", None)
    if original is None:
        upcast_half_weights(traced)
        return nullcontext()

    def add_const(self, name, val):
        if isinstance(val, torch.Tensor) and val.dtype == torch.float16 and val.numel() >= LARGE_WEIGHT_ELEMENTS:
            self.context.add(mb.constexpr_cast(source_val=val.detach().numpy(), output_dtype="fp32", name=name))
        else:
            original(self, name, val)

    return mock.patch.object(TorchConverter, "_add_const", add_const)


def upcast_half_weights(traced) -> None:
    """Every fp16 weight of a traced module back to fp32 (the values `halve_large_weights` rounded)."""
    assign_weights(traced, {k: v.float() if v.dtype == torch.float16 else v for k, v in traced.state_dict().items()})


def assign_weights(traced, state_dict: dict) -> None:
    """Set each named tensor of a traced module (its graph reads them as attributes)."""
    expected = set(traced.state_dict())
    if expected != set(state_dict):
        raise ValueError(f"weights do not match the traced UNet: {sorted(expected ^ set(state_dict))[:3]}")
    for name, value in state_dict.items():
        *path, leaf = name.split(".")
        module = traced
        for part in path:
            module = getattr(module, part)
        setattr(module, leaf, value)


def release_free_memory() -> None:
    """Collect cycles and hand the C heap's free pages back to the system (glibc keeps them otherwise),
    so that the peak that follows does not stack on memory nothing uses."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def log_memory(stage: str) -> None:
    import resource
    rss = _current_rss_gib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.debug("unet: %s (RSS %.2f GiB, peak %.2f GiB)", stage, rss, peak)


def _current_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux
        return float("nan")


def _as_numpy(inputs: dict) -> dict:
    return {k: v.numpy().astype(np.float32) for k, v in inputs.items()}


def _register_streaming_fp16_pass():
    """`python_coreml_sd::add_fp16_cast`: coremltools' add_fp16_cast that replaces each large fp32 weight by
    its fp16 copy as soon as the op using it is converted. The stock pass keeps every fp32 weight alive
    until a later dead-code pass, so fp32 and fp16 copies of all weights coexist (+50% peak memory)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if STREAMING_FP16_PASS in PASS_REGISTRY:
        return

    def large_fp32_weights(op) -> list:
        return [v for v in flat_inputs(op) if v.op is not None and v.op.op_type == "const" and v.dtype == types.fp32
                and v.val is not None and np.size(v.val) >= LARGE_WEIGHT_ELEMENTS]

    def fold_casts(weight) -> None:
        block = weight.op.enclosing_block
        for cast in list(weight.child_ops):
            folded = mb.const(val=cast.outputs[0].val, name=cast.outputs[0].name, before_op=cast)
            # anchored at the cast, the var's producer: coremltools then visits only its consumers
            # instead of every later op (4 s on SD 1.5)
            block.replace_uses_of_var_after_op(anchor_op=cast, old_var=cast.outputs[0], new_var=folded)
            block.remove_ops([cast])
        const_op = weight.op
        block.remove_ops([const_op])
        # The op and its vars form reference cycles: drop the array now rather than at the next gc.
        weight._sym_val = None
        const_op.val._sym_val = None

    @register_pass(namespace="python_coreml_sd")
    class streaming_add_fp16_cast(add_fp16_cast):  # noqa: N801 (pass names are snake_case)
        @staticmethod
        def fp16_overflow(op) -> bool:
            """The stock check, without its per-element index arrays (40 s of a 100 s SD 1.5 UNet
            conversion): does a finite fp32 const input (|x| < 1e38) exceed the fp16 range?"""
            return any(var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                       and _exceeds_fp16(np.asarray(var.op.val.val)) for var in flat_inputs(op))

        def _check_underflow_to_zero(self, new_var, var):
            # The stock check looks at arrays of fewer than 400 values only, but flattens (copies) every
            # weight to count them: 2 s on SD 1.5. Same check, counted without the copy.
            if var.val is None or np.size(var.val) < 400:
                super()._check_underflow_to_zero(new_var, var)

        def transform_op(self, op) -> None:
            weights = large_fp32_weights(op)
            if any(var.dtype == types.str and var.val == "int32" for var in flat_inputs(op)):  # the stock's
                # dtype-string case (it rewrites "int32" arguments), never met in a UNet
                super().transform_op(op)
            else:
                self._retype(op)
            for weight in weights:
                if weight.child_ops and all(c.op_type == "cast" and c.outputs[0].val is not None
                                            for c in weight.child_ops):
                    fold_casts(weight)

        def _retype(self, op) -> None:
            """The stock transform (each fp32 input cast to fp16, the op rebuilt in fp16, each output cast
            back to fp32 for its consumers), except that an input which is such a cast back is replaced by
            the fp16 var it came from. The stock pass casts it to fp16 again and leaves the pair for
            cast_optimization to remove: a third of the ops it builds, on a UNet 10 s."""
            inputs, changed = {}, False
            for param, value in op.inputs.items():
                if not self.should_cast_parameter(op, param):
                    continue
                items = [self._fp16_input(var, op) for var in flat(value)]
                if any(new is not old for new, old in zip(items, flat(value))):
                    changed = True
                inputs[param] = tuple(items) if isinstance(value, (list, tuple)) else items[0]
            if not changed:
                return
            inputs.update({k: v for k, v in op.inputs.items() if k not in inputs})
            outputs = getattr(mb, op.op_type)(**inputs, name=f"{op.name}_cast_fp16", before_op=op)
            block = op.enclosing_block
            for old, new in zip(op.outputs, outputs if isinstance(outputs, (list, tuple)) else [outputs]):
                if old.is_tensor_or_scalar_of(dtype="fp32") and not new.is_tensor_or_scalar_of(dtype="fp32"):
                    back = mb.cast(x=new, dtype="fp32", name=f"{new.name}_to_fp32", before_op=op)
                    self._fp16_source[back] = new
                    new = back
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=old, new_var=new, force_replace=True)
            block.remove_ops([op])

        def _fp16_input(self, var, op):
            if not var.is_tensor_or_scalar_of(dtype="fp32"):
                return var
            if var not in self._fp16_source and var.op is not None and var.op.op_type == "constexpr_cast":
                # an fp16 weight (half_weights_as_constexpr): the same array as an fp16 const
                self._fp16_source[var] = mb.const(val=var.op.source_val.val, name=f"{var.name}_to_fp16",
                                                  before_op=var.op)
            if var in self._fp16_source:
                return self._fp16_source[var]
            name = f"{var.name}_to_fp16"
            cache = self.current_cache_vars()
            if len(var.child_ops) > 1 and name in cache:
                return cache[name]
            cast = mb.cast(x=var, dtype="fp16", name=name, before_op=op)
            self._check_underflow_to_zero(cast, var)
            if len(var.child_ops) > 1:
                cache[name] = cast
            return cast

        def apply(self, prog):
            self._fp16_source = {}  # fp32 cast made by this pass (or constexpr weight) -> its fp16 var
            try:
                super().apply(prog)
            finally:
                self._fp16_source = {}
            for function in prog.functions.values():
                materialize_constexpr_casts(function)

    def materialize_constexpr_casts(block) -> None:
        """A weight left as constexpr_cast (its op stayed fp32) becomes an ordinary fp32 const."""
        with block:
            for op in [op for op in block.operations if op.op_type == "constexpr_cast"]:
                if op.outputs[0].child_ops or op.outputs[0] in block.outputs:
                    const = mb.const(val=op.source_val.val.astype(np.float32), name=op.outputs[0].name,
                                     before_op=op)
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=const,
                                                      force_replace=True)
                block.remove_ops([op])


def _exceeds_fp16(values: np.ndarray) -> bool:
    if values.size == 0 or max(values.max(), -values.min()) <= FP16_MAX:  # the common case: two reductions
        return False
    magnitude = np.abs(values)
    return bool(np.any((magnitude > FP16_MAX) & (magnitude < 1e38)))  # NaN and near-infinite values don't count


FP16_MAX = 65504.0
LARGE_WEIGHT_ELEMENTS = 4096
STREAMING_FP16_PASS = "python_coreml_sd::streaming_add_fp16_cast"
