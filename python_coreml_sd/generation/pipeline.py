"""The Stable Diffusion generation loop, written once for every backend (see components.py)."""
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from ..components import RESIDUAL, SD, SDXL, TABLE, Dims, inpainting_channels, text_to_unet_layout
from ..errors import UserError
from .components import ModelSet
from .prompts import PromptChunks, chunk_prompt, padded, weighted
from .random_source import MAX_SEED, RandomSource
from .schedulers import make_scheduler


def _clip_processor(models: ModelSet):
    """CLIP's resize/crop/normalise at the safety checker's input size."""
    from transformers import CLIPImageProcessor
    size = models["safety_checker"].input_shapes["clip_input"][-1]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def sample_posterior(moments: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A draw from the VAE posterior given the encoder's `latent` moments (mean and log-variance
    concatenated on channels), as diffusers' DiagonalGaussianDistribution.sample:
    mean + std * noise with std = exp(0.5 * clamp(logvar, -30, 20)). std is computed in float64 and
    rounded once to float32; the rest is float32 (the Swift pipeline computes it the same way)."""
    moments = np.asarray(moments, dtype=np.float32)
    mean, logvar = np.split(moments, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0).astype(np.float64)).astype(np.float32)
    return (mean + std * np.asarray(noise, dtype=np.float32)).astype(np.float32)


TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, SAFETY_CHECKER, CONTROLNET = (
    TABLE[name] for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker", "controlnet"))
RESIDUALS_STAGE = "first_residuals_"  # + a ControlNet's key: its residuals at the first step (parity's stages)


def control_input(name: str, key: str) -> str:
    """The name under which a ControlNet's inputs beyond the UNet's (controlnet_cond, controlnet_scale) travel with
    the UNet's inputs (per batch entry, like SDXL's added conditions): one pair per ControlNet `key`."""
    return f"{name}:{key}"


def _sizes_text(sizes) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "PNDM"
    image: Image.Image = None  # img2img start image (inpainting: the image to repaint)
    # None: 0.75 for img2img; with a mask the model's inpainting default (INPAINT_STRENGTH), which the pipeline fills in
    strength: float = None
    mask: Image.Image = None  # inpainting: white is repainted, black kept (the size of `image`)
    # SDXL's micro-conditioning (diffusers' StableDiffusionXLPipeline): None means the image size, as there.
    original_size: tuple = None  # (height, width) in pixels
    crops_coords_top_left: tuple = (0, 0)  # (y, x)
    target_size: tuple = None  # (height, width)
    aesthetic_score: float = 6.0  # the refiner's time ids (its negative: negative_aesthetic_score)
    negative_aesthetic_score: float = 2.5
    # SDXL: the base denoises up to this fraction of the schedule, the refiner the rest (diffusers'
    # denoising_end on the base, denoising_start on the refiner); None: the base alone
    refiner_start: float = None
    # The image size in pixels, one the converted models take (--latent-sizes); None: their default size
    height: int = None
    width: int = None
    # --controlnet's condition images (edges, depth...), one per ControlNet (an image or a sequence; kept as a
    # tuple): each resized to the image size
    control_image: tuple = None
    # Each ControlNet's residuals are multiplied by its scale: one number (or a sequence of one) for all, or one per
    # ControlNet (kept as a tuple), as diffusers' controlnet_conditioning_scale
    controlnet_scale: tuple = 1.0

    def __post_init__(self):
        if self.strength is None and self.mask is None:
            self.strength = 0.75
        if self.control_image is not None:
            self.control_image = (self.control_image,) if isinstance(self.control_image, Image.Image) else \
                tuple(self.control_image)
        scales = self.controlnet_scale
        self.controlnet_scale = tuple(float(v) for v in (scales if isinstance(scales, (list, tuple)) else (scales,)))

    def validate(self):
        if not self.prompt or not self.prompt.strip():
            raise UserError("the prompt is empty; pass --prompt TEXT")
        if self.num_inference_steps < 1:
            raise UserError(f"--num-inference-steps must be at least 1, got {self.num_inference_steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed {self.seed} is outside 0..{MAX_SEED} (NumPy's RandomState seeds, which every "
                            "backend and the Swift package share)")
        if not self.controlnet_scale or not all(math.isfinite(v) for v in self.controlnet_scale):
            raise UserError(f"--controlnet-scale takes finite numbers, got {' '.join(map(str, self.controlnet_scale))}")
        if not math.isfinite(self.guidance_scale):
            raise UserError(f"--guidance-scale must be a finite number, got {self.guidance_scale}")
        if self.image is not None and self.strength is not None and not 0 < self.strength <= 1:  # also refuses nan
            raise UserError(f"--strength must be in (0, 1], got {self.strength}")
        if self.mask is not None and self.image is None:
            raise UserError("--mask needs --image IMAGE: the picture whose white-masked part is repainted")
        if self.mask is not None and self.mask.size != self.image.size:
            raise UserError(f"--mask is {self.mask.size[0]}x{self.mask.size[1]} but --image is {self.image.size[0]}x"
                            f"{self.image.size[1]}; the mask must cover the image pixel for pixel (white: repaint)")
        if self.mask is not None and self.refiner_start is not None:
            raise UserError("--mask with --refiner-start is not supported yet: inpaint with the base alone")
        if self.refiner_start is not None and not 0 < self.refiner_start < 1:  # also refuses nan
            raise UserError(f"--refiner-start must be in (0, 1) (the fraction of the steps the base runs), got "
                            f"{self.refiner_start}")
        for flag, pair in (("--original-size", self.original_size), ("--crops-coords-top-left", self.crops_coords_top_left),
                           ("--target-size", self.target_size)):
            if pair is not None and (len(pair) != 2 or not all(math.isfinite(v) and v >= 0 for v in pair)):
                raise UserError(f"{flag} takes two numbers of at least 0 (height width, or y x), got {pair}")


# diffusers' default strength with a mask: StableDiffusionInpaintPipeline's 1, StableDiffusionXLInpaintPipeline's
# 0.9999 (so SDXL's inpainting starts from the image noised, one step fewer, rather than from noise alone)
INPAINT_STRENGTH = {SD: 1.0, SDXL: 0.9999}


def check_control_counts(request: GenerationRequest, count: int, names=()) -> None:
    """One condition image per ControlNet (`count` of them; `names`: theirs, for the message), and one scale for
    all or one each, as diffusers' MultiControlNetModel takes them; with --mask, one ControlNet may go without its
    image (an inpaint ControlNet: the masked image is its condition). A UserError naming the fix otherwise."""
    listed = f" (--controlnet {' '.join(map(str, names))})" if names else ""
    images = len(request.control_image or ())
    if count and not images and not (request.mask is not None and count == 1):
        raise UserError(f"--controlnet needs --control-image IMAGE, one per ControlNet{listed}")
    if count and images and images != count:
        raise UserError(f"--control-image: {images} image{'s' * (images != 1)} for {count} ControlNet"
                        f"{'s' * (count != 1)}{listed}; pass one condition image per ControlNet, in the same order")
    if not count and images:
        raise UserError("--control-image needs --controlnet NAME (and a UNet converted for ControlNets)")
    scales = len(request.controlnet_scale)
    if count and scales not in (1, count):
        raise UserError(f"--controlnet-scale: {scales} scales for {count} ControlNets{listed}; pass one scale for all "
                        "or one per ControlNet")


@dataclass(frozen=True)
class MaskBlend:
    """Inpainting with a 4-channel UNet (diffusers' StableDiffusionControlNetInpaintPipeline): after each step the
    latents outside the mask are the image's, noised to the next step's timestep (after the last: as they are)."""
    mask: np.ndarray  # (1, 1, h, w) at latent size, 1: repaint
    image_latents: np.ndarray  # (1, C, h, w), scaled
    noise: np.ndarray  # the start's draw, which re-noises them

    def __call__(self, latents, scheduler, timesteps, i: int) -> np.ndarray:
        kept = self.image_latents
        if i < len(timesteps) - 1:
            kept = scheduler.add_noise(torch.from_numpy(kept), torch.from_numpy(self.noise),
                                       torch.tensor([timesteps[i + 1]])).numpy()
        return ((1 - self.mask) * kept + self.mask * latents).astype(np.float32)


@dataclass
class GenerationResult:
    image: Image.Image
    flagged: bool  # the safety checker replaced the image
    seconds_per_step: float
    seconds_total: float
    intermediates: dict = field(default_factory=dict)  # named arrays for parity reports


class StableDiffusionPipeline:
    def __init__(self, models: ModelSet, tokenizer, scheduler_config: dict, vae_scaling_factor: float = 0.18215,
                 progress: bool = True, tokenizer_2=None, force_zeros_for_empty_prompt: bool = False):
        if not models.has_unet or "text_encoder" not in models or "vae_decoder" not in models:
            raise UserError("generation needs a text encoder, a UNet and a VAE decoder")
        self.family = models.family
        if self.family == SDXL and ("text_encoder_2" not in models or tokenizer_2 is None):
            raise UserError("this UNet is SDXL's (it takes time_ids and text_embeds): generation needs text_encoder_2 "
                            "and tokenizer_2 too; convert with --convert-text-encoder from the SDXL model")
        self.models, self.tokenizer, self.tokenizer_2 = models, tokenizer, tokenizer_2
        # diffusers' StableDiffusionXLPipeline: no negative prompt -> zero negative embeddings (SDXL base's config)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt and self.family == SDXL
        self.scheduler_config, self.vae_scaling_factor = dict(scheduler_config), vae_scaling_factor
        self.progress = progress
        shapes = models.unet_input_shapes()
        self.unet_batch, self.sample_channels, self.latent_h, self.latent_w = shapes["sample"]
        self.latent_channels = models["vae_decoder"].input_shapes.get("z", (1, Dims.latent_channels))[1]
        # an inpainting UNet: its sample takes the mask and the masked image's latents after the latents
        self.inpaint = self.sample_channels == inpainting_channels(self.latent_channels)
        self.sequence_length = models["text_encoder"].input_shapes.get("input_ids", (1, 77))[1]
        self.latent_sizes = self._check_sizes()
        self._check_controlnet()
        self._clip_processor = _clip_processor(models) if "safety_checker" in models else None

    def _check_controlnet(self):
        if not self.models.controlnets:
            return
        if RESIDUAL.format(0) not in self.models.unet_input_shapes():
            raise UserError("a ControlNet was given but this UNet takes no ControlNet residuals (additional_residual_0, "
                            "...); convert it with --convert-unet --unet-support-controlnet")
        for key in self.models.controlnets:
            if "controlnet_cond" not in self.models[key].input_shapes:
                continue
            # The sizes both take (the ControlNet's condition image is 8x the latents), the UNet's default among them.
            sizes = [(h // 8, w // 8) for *_, h, w in self.models[key].allowed("controlnet_cond")]
            if self.latent_sizes[0] not in sizes:
                raise UserError(f"the ControlNet was converted for {_sizes_text((8 * h, 8 * w) for h, w in sizes)} "
                                f"images but the UNet makes {self.image_size[0]}x{self.image_size[1]}; convert both "
                                "with the same --latent-h/--latent-w or --latent-sizes")
            self.latent_sizes = [size for size in self.latent_sizes if size in sizes]

    def check_request(self, request) -> None:
        """What these models cannot do for `request` (checked before any work): a mask needs an inpainting UNet, and
        an inpainting UNet a mask."""
        if request.mask is not None and not self.inpaint and not self.models.controlnets:
            raise UserError(f"--mask needs an inpainting UNet (its sample takes {inpainting_channels(self.latent_channels)} "
                            f"channels: latents, mask, masked-image latents) and this one takes {self.sample_channels}; "
                            "convert an inpainting model (e.g. tiny-inpaint), or take the ControlNet inpaint route: "
                            "--controlnet with an inpaint ControlNet and a UNet converted with --unet-support-controlnet")
        if self.inpaint and request.mask is None:
            raise UserError("this UNet is an inpainting UNet (its sample takes the mask and the masked image too): "
                            "pass --image IMAGE and --mask MASK")
        if self.inpaint and self.models.controlnets:
            raise UserError("--mask with --controlnet is not supported yet: inpaint without the ControlNet")

    def control_inputs(self, request) -> dict:
        """Each ControlNet's condition image (diffusers' preprocessing: RGB, resized, [0, 1], NCHW) and scale,
        [unconditional, conditional] like every input of the guided UNet, under its `control_input` names."""
        keys = self.models.controlnets
        check_control_counts(request, len(keys))
        if not keys:
            return {}
        inputs = {}
        # With --mask and no --control-image, the one ControlNet is an inpaint ControlNet: the masked image steers it
        conds = ([self.control_condition(image) for image in request.control_image] if request.control_image
                 else [self.inpaint_control_condition(request)])
        scales = request.controlnet_scale  # one given: the same for all
        for key, cond, scale in zip(keys, conds, scales * len(keys) if len(scales) == 1 else scales):
            inputs[control_input("controlnet_cond", key)] = np.concatenate([cond, cond])
            inputs[control_input("controlnet_scale", key)] = np.full((2,), scale, np.float32)
        return inputs

    def control_condition(self, image: Image.Image) -> np.ndarray:
        """(1, 3, H, W) in [0, 1]: a condition image resized to the image size (of its aspect ratio, or refused)."""
        h, w = self.image_size
        width, height = image.size
        if abs(width / height - w / h) > 0.01:
            raise UserError(f"--control-image is {width}x{height}, not the {w}x{h} aspect ratio of the images this "
                            "UNet makes; crop it to that ratio (it is then resized)")
        array = np.asarray(image.convert("RGB").resize((w, h), Image.LANCZOS), np.float32) / 255
        return array.transpose(2, 0, 1)[None]

    def run_unet(self, inputs: dict, unet: str, record: dict = None) -> np.ndarray:
        """The UNet, after the ControlNets whose images the inputs carry: their residuals, each scaled, summed
        (diffusers' MultiControlNetModel) join the inputs. `record`: receives each ControlNet's residuals, unscaled
        and flattened into one array, as `first_residuals_<key>` (parity compares them)."""
        inputs, residuals = dict(inputs), {}
        for key in self.models.controlnets:
            if control_input("controlnet_cond", key) not in inputs:
                continue
            cond = inputs.pop(control_input("controlnet_cond", key))
            scale = np.float32(inputs.pop(control_input("controlnet_scale", key))[0])
            out = self.models[key].predict({name: cond if name == "controlnet_cond" else inputs[name]
                                            for name in CONTROLNET.io(self.family).inputs})
            if record is not None:
                record[f"{RESIDUALS_STAGE}{key}"] = np.concatenate([value.ravel() for value in out.values()])
            for name, value in out.items():
                residuals[name] = value * scale + residuals[name] if name in residuals else value * scale
        return self.models.run_unet({**inputs, **residuals}, unet)

    def _check_sizes(self) -> list:
        """The latent sizes (h, w) both the UNet and the VAE decoder take, the UNet's default first."""
        unet = [tuple(s[2:]) for s in self.models.unet_allowed("sample")]
        decoder = self.models["vae_decoder"]
        if "z" not in decoder.input_shapes:
            return unet
        vae = [tuple(z[2:]) for z in decoder.allowed("z")]
        if unet[0] not in vae:
            raise UserError(f"the VAE decoder was converted for {_sizes_text(vae)} latents but the UNet for "
                            f"{_sizes_text(unet)}; convert both with the same --latent-h/--latent-w or --latent-sizes")
        if "vae_encoder" in self.models:
            shapes = self.models["vae_encoder"].input_shapes
            sample = shapes.get("x", shapes.get("sample"))
            if sample and tuple(sample[2:]) != (8 * self.latent_h, 8 * self.latent_w):
                raise UserError(f"the VAE encoder was converted for {sample[2]}x{sample[3]} images but the UNet for "
                                f"{8 * self.latent_h}x{8 * self.latent_w}; reconvert it with the same latent size")
        return [size for size in unet if size in vae]

    def use_size(self, height: int = None, width: int = None) -> None:
        """Generate at `height` x `width` pixels (None: the default size's), one of the sizes the models take."""
        default_h, default_w = self.latent_sizes[0]
        wanted = (height or 8 * default_h, width or 8 * default_w)
        sizes = {(8 * h, 8 * w): (h, w) for h, w in self.latent_sizes}
        if wanted not in sizes:
            raise UserError(f"--height {wanted[0]} --width {wanted[1]}: the models take "
                            f"{_sizes_text(sizes)} pixels (height x width); pass one of them, or "
                            "reconvert with --latent-sizes")
        self.latent_h, self.latent_w = sizes[wanted]

    @property
    def image_size(self) -> tuple:
        return 8 * self.latent_h, 8 * self.latent_w

    def tokenize(self, text: str, tokenizer=None) -> np.ndarray:
        """(1, S) token ids of the prompt's first text-encoder window (weights and later windows aside)."""
        return self.prompt_chunks(text, tokenizer=tokenizer).ids[:1].astype(np.float32)

    @property
    def prompt_chunk_counts(self) -> list:
        """The numbers of text-encoder windows the UNet takes side by side (its contexts / the encoder's length),
        ascending: 1..N for a UNet converted with --max-prompt-chunks N."""
        contexts = [shape[-1] for shape in self.models.unet_allowed(UNET.inputs[2])]
        return sorted({max(context // self.sequence_length, 1) for context in contexts})

    @property
    def max_prompt_chunks(self) -> int:
        """The most windows a prompt may fill; None: any (`ModelSet.any_prompt_length`)."""
        return None if self.models.any_prompt_length else self.prompt_chunk_counts[-1]

    def prompt_chunks(self, text: str, min_chunks: int = 1, tokenizer=None) -> PromptChunks:
        """The prompt's weighted tokens in windows (generation/prompts.py); warns when the UNet takes fewer."""
        chunks = chunk_prompt(tokenizer or self.tokenizer, text, min_chunks, self.sequence_length)
        if self.max_prompt_chunks is not None and chunks.count > self.max_prompt_chunks:
            warnings.warn(f"prompt is longer than {self.sequence_length * self.max_prompt_chunks} tokens and was "
                          "truncated", UserWarning)
            chunks = PromptChunks(chunks.ids[:self.max_prompt_chunks], chunks.weights[:self.max_prompt_chunks])
        return chunks

    def encode_text(self, text: str, min_chunks: int = 1, chunks: PromptChunks = None) -> np.ndarray:
        """(1, C, 1, S) embeddings, the UNet's encoder_hidden_states layout: each window encoded, weighted, and
        the windows concatenated along the sequence."""
        chunks = chunks or self.prompt_chunks(text, min_chunks)
        encoder = self.models["text_encoder"]
        hidden = [weighted(encoder.predict(TEXT_ENCODER.feed(ids[None].astype(np.float32)))[TEXT_ENCODER.outputs[0]],
                           weights) for ids, weights in zip(chunks.ids, chunks.weights)]
        return text_to_unet_layout(np.concatenate(hidden, axis=1)).astype(np.float32)

    def window_count(self, counts) -> int:
        """The fewest windows the UNet takes that hold the longest of these prompts' windows (a UNet of one
        context: exactly its count; one of any context: the longest's)."""
        longest = max(counts)
        if self.models.any_prompt_length:
            return longest
        return min(k for k in self.prompt_chunk_counts if k >= longest)

    def encode_prompts(self, prompt: str, negative_prompt: str) -> tuple:
        """(conditional, [unconditional, conditional]) embeddings, both with as many windows as the longer."""
        chunks = [self.prompt_chunks(text) for text in (prompt, negative_prompt)]
        count = self.window_count(c.count for c in chunks)
        # Padded to the longer's windows, not chunked again (no second truncation warning).
        cond, uncond = (self.encode_text(text, chunks=padded(c, count, self.tokenizer))
                        for text, c in zip((prompt, negative_prompt), chunks))
        return cond, np.concatenate([uncond, cond])

    def xl_windows(self, texts) -> dict:
        """{text: {encoder: PromptChunks}}: each text's windows for both SDXL tokenizers, all padded to one count
        (the fewest the UNet takes that hold the longest), so the prompt and its negative pair up."""
        tokenizers = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
        chunks = {text: {name: self.prompt_chunks(text, tokenizer=tokenizer) for name, tokenizer in tokenizers.items()}
                  for text in dict.fromkeys(texts)}
        count = self.window_count(c.count for per_text in chunks.values() for c in per_text.values())
        return {text: {name: padded(c, count, tokenizers[name]) for name, c in per_text.items()}
                for text, per_text in chunks.items()}

    def encode_xl(self, windows: dict) -> dict:
        """SDXL's text conditioning, as diffusers' encode_prompt, window by window as compel and A1111 do: each
        encoder's penultimate states side by side on channels, the windows one after another on the sequence, in
        the UNet's (1, C, 1, S) layout; text_encoder_2's pooled text_embeds (1, P) of the first window.
        `windows`: a text's {encoder: PromptChunks} (`xl_windows`)."""
        states, pooled = TABLE["text_encoder_2"].io(SDXL).outputs
        # Prompt weights scale each encoder's states (the pooled embedding stays unweighted, as A1111's).
        hidden, first_pooled = {}, None
        for name, chunks in windows.items():
            outs = [self.models[name].predict(TABLE[name].feed(ids[None].astype(np.float32), family=SDXL))
                    for ids in chunks.ids]
            hidden[name] = np.concatenate([weighted(out[states], w) for out, w in zip(outs, chunks.weights)], axis=1)
            first_pooled = outs[0][pooled] if name == "text_encoder_2" else first_pooled
        return {"text_embeddings": text_to_unet_layout(np.concatenate(list(hidden.values()), axis=-1)),
                "text_encoder_hidden": hidden["text_encoder"], "text_encoder_2_hidden": hidden["text_encoder_2"],
                "pooled_embeddings": first_pooled.astype(np.float32)}

    def encode_xl_pair(self, request, cache: dict = None) -> tuple:
        """(conditional, unconditional) encode_xl of the prompt and negative prompt, with as many windows each;
        `cache`: text -> encodings of one generation (the refiner reuses the base's)."""
        texts = (request.prompt, request.negative_prompt)
        cache = {} if cache is None else cache
        if not all(text in cache for text in texts):  # each distinct text encoded once
            cache.update((text, self.encode_xl(windows)) for text, windows in self.xl_windows(texts).items())
        return tuple(cache[text] for text in texts)

    def refiner_conditioning(self, request, cache: dict = None) -> tuple:
        """The refiner's (embeddings, added conditions): text_encoder_2's states alone, its pooled embeds, time
        ids with the aesthetic scores; the negative prompt always encoded (the refiner's
        force_zeros_for_empty_prompt is false)."""
        cond, uncond = self.encode_xl_pair(request, cache)
        states = [text_to_unet_layout(e["text_encoder_2_hidden"]) for e in (uncond, cond)]
        return np.concatenate(states), {"time_ids": self.time_ids(request, "refiner"), "text_embeds": np.concatenate(
            [uncond["pooled_embeddings"], cond["pooled_embeddings"]])}

    def conditioning(self, request, cache: dict = None) -> tuple:
        """(embeddings [unconditional, conditional] in the UNet's layout, SDXL's added conditions or {}, the
        conditional prompt's intermediates for parity)."""
        if self.family == SD:
            cond, embeddings = self.encode_prompts(request.prompt, request.negative_prompt)
            return embeddings, {}, {"text_embeddings": cond}
        cond, uncond = self.encode_xl_pair(request, cache)
        if self.force_zeros_for_empty_prompt and not request.negative_prompt:
            uncond = {k: np.zeros_like(v) for k, v in cond.items()}
        added = {"time_ids": self.time_ids(request), "text_embeds": np.concatenate([uncond["pooled_embeddings"],
                                                                                    cond["pooled_embeddings"]])}
        return np.concatenate([uncond["text_embeddings"], cond["text_embeddings"]]), added, cond

    def time_ids(self, request, unet: str = "unet") -> np.ndarray:
        """SDXL's micro-conditioning, [unconditional, conditional]: original size, crop top-left, then the target
        size (base, 6 ids) or the aesthetic score (refiner, 5 ids), as diffusers' _get_add_time_ids."""
        size = self.image_size
        head = tuple(request.original_size or size) + tuple(request.crops_coords_top_left)
        if self.models.unet_input_shapes(unet)["time_ids"][-1] == 5:
            rows = [head + (request.negative_aesthetic_score,), head + (request.aesthetic_score,)]
        else:
            rows = [head + tuple(request.target_size or size)] * 2
        return np.asarray(rows, dtype=np.float32)

    def predict_noise(self, latents, t, embeddings, guidance_scale, added: dict = None, unet: str = "unet",
                      record: dict = None) -> np.ndarray:
        """Classifier-free guidance; embeddings (and SDXL's added conditions) are [unconditional, conditional].
        guidance_scale <= 1 is no guidance, as diffusers' do_classifier_free_guidance (SDXL-Turbo's 0): the
        conditional prediction alone, one UNet call per step on a batch-one UNet. `record`: receives each
        ControlNet's residuals (run_unet)."""
        timestep = np.full((2,), float(t), dtype=np.float32)
        added = added or {}  # SDXL's inputs beyond SD's, by name (components.UNET_XL_INPUTS)
        guided = guidance_scale > 1
        if self.models.unet_input_shapes(unet)["sample"][0] == 2:
            out = self.run_unet({**UNET.feed(np.concatenate([latents, latents]), timestep, embeddings), **added}, unet,
                                record)
            uncond, cond = out[0:1], out[1:2]
        else:
            def half(i):  # 0: unconditional, 1: conditional (`record` keeps the last call's, the conditional's)
                return self.run_unet({**UNET.feed(latents, timestep[:1], embeddings[i:i + 1]),
                                      **{k: v[i:i + 1] for k, v in added.items()}}, unet, record)
            uncond, cond = half(0) if guided else None, half(1)
        return uncond + guidance_scale * (cond - uncond) if guided else cond

    def initial_latents(self, request, scheduler, rng: RandomSource, draws: dict):
        """(latents, timesteps) the loop starts from; `draws` receives the draw `noise` and, for img2img, the
        image's `image_latents` (what a 4-channel UNet's mask blend re-noises)."""
        shape = (1, self.latent_channels, self.latent_h, self.latent_w)
        scheduler.set_timesteps(request.num_inference_steps)
        timesteps = scheduler.timesteps
        # diffusers' inpainting at strength 1 starts from noise alone (the image enters through the mask inputs)
        if request.image is None or (request.mask is not None and request.strength == 1):
            draws["noise"] = rng.normal(shape)
            return draws["noise"] * float(scheduler.init_noise_sigma), timesteps
        if "vae_encoder" not in self.models:
            raise UserError("img2img needs a VAE encoder; convert it with --convert-vae-encoder")
        start = min(int(request.num_inference_steps * request.strength), request.num_inference_steps)
        timesteps = timesteps[request.num_inference_steps - start:]
        if len(timesteps) == 0:
            raise UserError(f"--strength {request.strength} is too small for {request.num_inference_steps} steps: no "
                            "denoising step would run (with a mask, SDXL's default is 0.9999, as diffusers'); pass more "
                            "--num-inference-steps or a larger --strength")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(request.num_inference_steps - start)
        signal, noise_scale = self._noise_coefficients(scheduler, timesteps[0])
        encoder = self.models["vae_encoder"]
        # Draw order as before the moments interface (diagonal_noise, then noise), so a seed keeps its image.
        if "x" not in encoder.input_shapes and "diagonal_noise" in encoder.input_shapes:
            return self._legacy_encoder_latents(request, rng, shape, signal, noise_scale), timesteps
        latents = self.encode_image(self.preprocess(request.image), rng)  # draws diagonal_noise, then noise
        noise = rng.normal(shape)
        draws.update(noise=noise, image_latents=latents)
        return np.float32(signal) * latents + np.float32(noise_scale) * noise, timesteps

    def _moments_encoder(self):
        encoder = self.models["vae_encoder"] if "vae_encoder" in self.models else None
        if encoder is None or "x" not in encoder.input_shapes:
            raise UserError("img2img and inpainting need a VAE encoder with the `x` -> `latent` moments interface; "
                            "convert it with --convert-vae-encoder")
        return encoder

    def encode_image(self, image: np.ndarray, rng: RandomSource) -> np.ndarray:
        """The scaled latents of a preprocessed image: its VAE posterior sampled with the next draw."""
        moments = self._moments_encoder().predict(VAE_ENCODER.feed(image))[VAE_ENCODER.outputs[0]]
        noise = rng.normal((1, self.latent_channels, self.latent_h, self.latent_w))
        return np.float32(self.vae_scaling_factor) * sample_posterior(moments, noise)

    def pixel_mask(self, request) -> np.ndarray:
        """(1, 1, H, W): the mask as diffusers' mask processor makes it: resized to the image size (Lanczos), grey,
        binarised at 0.5 (1: repaint)."""
        return (self.grey_mask(request)[None, None] >= 0.5).astype(np.float32)

    def grey_mask(self, request) -> np.ndarray:
        """(H, W) in [0, 1]: the mask resized to the image size (Lanczos), grey, as diffusers' processors read it."""
        h, w = self.image_size
        return np.asarray(request.mask.resize((w, h), Image.LANCZOS).convert("L"), np.float32) / 255

    def latent_mask(self, mask: np.ndarray) -> np.ndarray:
        """The pixel mask at latent size (nearest), as diffusers' prepare_mask_latents."""
        return torch.nn.functional.interpolate(torch.from_numpy(mask), size=(self.latent_h, self.latent_w)).numpy()

    def inpaint_condition(self, request, rng: RandomSource, intermediates: dict) -> np.ndarray:
        """(1, 1 + latent channels, h, w): the mask at latent size and the masked image's latents, as diffusers'
        StableDiffusionInpaintPipeline makes them: the image kept where the mask is below 0.5; its VAE posterior
        sampled (the next draw) and scaled."""
        mask = self.pixel_mask(request)
        latents = self.encode_image(self.preprocess(request.image) * (mask < 0.5), rng)
        small = self.latent_mask(mask)
        intermediates.update(mask=small, masked_image_latents=latents)
        return np.concatenate([small, latents], axis=1)

    def mask_blend(self, request, rng: RandomSource, start: dict, intermediates: dict) -> "MaskBlend":
        """A 4-channel UNet's inpainting (the ControlNet inpaint route, diffusers'
        StableDiffusionControlNetInpaintPipeline): the image's latents (img2img's; at strength 1 the image encoded
        with the next draw) and the start's noise, blended outside the mask after every step."""
        self._moments_encoder()
        image_latents = start.get("image_latents")
        if image_latents is None:
            image_latents = self.encode_image(self.preprocess(request.image), rng)
        mask = self.latent_mask(self.pixel_mask(request))
        intermediates.update(mask=mask, image_latents=image_latents)
        return MaskBlend(mask, image_latents, start["noise"])

    def inpaint_control_condition(self, request) -> np.ndarray:
        """(1, 3, H, W): an inpaint ControlNet's condition, as diffusers' make_inpaint_condition (its
        ControlNet inpainting docs): the image in [0, 1] with the masked pixels (grey mask above 0.5) set to -1;
        image and mask resized to the image size first."""
        h, w = self.image_size
        image = np.asarray(request.image.convert("RGB").resize((w, h), Image.LANCZOS), np.float32) / 255
        image = np.where((self.grey_mask(request) > 0.5)[..., None], np.float32(-1), image)
        return image.transpose(2, 0, 1)[None].astype(np.float32)

    def _legacy_encoder_latents(self, request, rng, shape, signal, noise_scale):
        """Encoders converted before the moments interface (`sample`, `diagonal_noise`, `noise`,
        `sqrt_alphas_cumprod`, `sqrt_one_minus_alphas_cumprod` -> `latent_dist`) sample and noise inside."""
        inputs = {"sample": self.preprocess(request.image), "diagonal_noise": rng.normal(shape),
                  "noise": rng.normal(shape), "sqrt_alphas_cumprod": np.array([[signal]], np.float32),
                  "sqrt_one_minus_alphas_cumprod": np.array([[noise_scale]], np.float32)}
        return self.models["vae_encoder"].predict(inputs)["latent_dist"]

    @staticmethod
    def _noise_coefficients(scheduler, t):
        """add_noise(x, n, t) = a*x + b*n for every diffusers scheduler: read a and b off it (also for
        sigma-based schedulers such as Euler and LMS); the Swift pipeline noises the same way."""
        one, zero, step = torch.ones(1), torch.zeros(1), torch.as_tensor([t])
        return float(scheduler.add_noise(one, zero, step)), float(scheduler.add_noise(zero, one, step))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        h, w = self.image_size
        array = np.asarray(image.convert("RGB").resize((w, h), Image.LANCZOS), dtype=np.float32) / 127.5 - 1
        return array.transpose(2, 0, 1)[None]

    def decode(self, latents) -> np.ndarray:
        """NCHW image in [0, 1]."""
        out = self.models["vae_decoder"].predict(VAE_DECODER.feed(latents / self.vae_scaling_factor))
        image = out[VAE_DECODER.outputs[0]]
        return np.clip(image / 2 + 0.5, 0, 1)

    def safety_check(self, image: np.ndarray):
        if "safety_checker" not in self.models:
            return image, False
        pil = Image.fromarray((image[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))
        clip_input = self._clip_processor(pil, return_tensors="np").pixel_values.astype(np.float32)
        out = self.models["safety_checker"].predict(SAFETY_CHECKER.feed(
            clip_input, image.transpose(0, 2, 3, 1).astype(np.float32), np.zeros((1,), np.float32)))
        filtered, has_nsfw_concepts = (out[name] for name in SAFETY_CHECKER.outputs[:2])
        return filtered.transpose(0, 3, 1, 2), bool(np.asarray(has_nsfw_concepts).ravel()[0] > 0.5)

    def split_for_refiner(self, request, scheduler, timesteps):
        """(the base's timesteps, the refiner's scheduler and timesteps) for --refiner-start, as diffusers'
        denoising_end on the base and denoising_start on the refiner: the base keeps the timesteps at or above
        the cutoff, the refiner (a fresh scheduler, begun where the base stopped) those below it."""
        if not self.models.has_refiner():
            raise UserError("--refiner-start needs the refiner's UNet: convert it with --convert-unet --refiner-version "
                            "MODEL (and, for --backend torch, pass --refiner-version)")
        train = scheduler.config.num_train_timesteps
        cutoff = int(round(train - request.refiner_start * train))
        base = timesteps[:len([t for t in timesteps if t >= cutoff])]
        refiner = make_scheduler(request.scheduler, self.scheduler_config)
        refiner.set_timesteps(request.num_inference_steps)
        steps = int((refiner.timesteps < cutoff).sum())
        if refiner.order == 2 and steps % 2 == 0:
            steps += 1
        begin = len(refiner.timesteps) - steps
        if hasattr(refiner, "set_begin_index"):
            refiner.set_begin_index(begin)
        return base, refiner, refiner.timesteps[begin:]

    def denoise(self, latents, scheduler, timesteps, embeddings, added, request, step_kwargs, unet="unet",
                intermediates=None, condition=None, blend=None):
        """`condition`: an inpainting UNet's mask and masked-image latents, after the scaled latents at each step;
        `blend`: a 4-channel UNet's MaskBlend, applied after each step."""
        from tqdm import tqdm
        for i, t in enumerate(tqdm(timesteps, desc=f"denoising ({unet})", unit="step", disable=not self.progress)):
            model_input = scheduler.scale_model_input(torch.from_numpy(latents), t).numpy()
            if condition is not None:
                model_input = np.concatenate([model_input, condition], axis=1)
            noise = self.predict_noise(model_input, t, embeddings, request.guidance_scale, added, unet,
                                       intermediates if i == 0 else None)
            if i == 0 and intermediates is not None:
                intermediates[f"first_noise_pred{'_refiner' if unet == 'refiner' else ''}"] = noise
            latents = scheduler.step(torch.from_numpy(noise), t, torch.from_numpy(latents),
                                     **step_kwargs).prev_sample.numpy().astype(np.float32)
            if blend is not None:
                latents = blend(latents, scheduler, timesteps, i)
        return latents

    def with_default_strength(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with a mask and no strength given: with this model family's inpainting default."""
        if request.mask is None or request.strength is not None:
            return request
        return replace(request, strength=INPAINT_STRENGTH[self.family])

    def generate(self, request: GenerationRequest) -> GenerationResult:
        request.validate()
        request = self.with_default_strength(request)
        self.check_request(request)
        self.use_size(request.height, request.width)
        if request.refiner_start is not None and self.family != SDXL:
            raise UserError("--refiner-start is for SDXL models with a refiner; this UNet is not SDXL's")
        start = time.perf_counter()
        rng = RandomSource(request.seed)
        scheduler = make_scheduler(request.scheduler, self.scheduler_config)
        encoded = {}  # SDXL: each text encoded once, for the base and the refiner
        embeddings, added, intermediates = self.conditioning(request, encoded)
        added = {**added, **self.control_inputs(request)}
        intermediates = dict(intermediates)
        start_draws = {}
        latents, timesteps = self.initial_latents(request, scheduler, rng, start_draws)
        condition = self.inpaint_condition(request, rng, intermediates) if self.inpaint else None
        blend = (self.mask_blend(request, rng, start_draws, intermediates)
                 if request.mask is not None and not self.inpaint else None)
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": rng.torch_generator()} if takes_generator else {}
        stages = [("unet", scheduler, timesteps, embeddings, added)]
        if request.refiner_start is not None:
            base, refiner, refiner_steps = self.split_for_refiner(request, scheduler, timesteps)
            stages = [("unet", scheduler, base, embeddings, added),
                      ("refiner", refiner, refiner_steps, *self.refiner_conditioning(request, encoded))]
        loop_start = time.perf_counter()
        for unet, stage_scheduler, stage_steps, stage_embeddings, stage_added in stages:
            latents = self.denoise(latents, stage_scheduler, stage_steps, stage_embeddings, stage_added, request,
                                   step_kwargs, unet, intermediates, condition if unet == "unet" else None, blend)
        steps = sum(len(stage[2]) for stage in stages)
        per_step = (time.perf_counter() - loop_start) / max(steps, 1)
        intermediates["final_latents"] = latents
        decoded = self.decode(latents)
        intermediates["decoded_image"] = decoded
        checked, flagged = self.safety_check(decoded)
        pil = Image.fromarray((checked[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))
        return GenerationResult(pil, flagged, per_step, time.perf_counter() - start, intermediates)
