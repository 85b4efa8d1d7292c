"""Closed-form stand-ins for the text encoder, UNet, VAE and safety checker, and the generation loop.

The Swift package (`swift/Tests/TestSupport/ClosedFormModels.swift`) implements the same
formulas. Both sides run the same loop (tokenize, encode, guidance, scheduler steps, decode, safety
check, img2img start) around them, so comparing final latents checks the loop logic of each side
without any real weights. Every formula rounds to float32 at the same points on both sides:
scalars are computed in float64 and rounded once, tensors are float32.
"""
from dataclasses import dataclass, field, replace
import math

import numpy as np
import torch

from ..components import SD, SDXL, TABLE, TIME_IDS, Dims, text_from_unet_layout

LATENT_SCALE = 0.18215
HIDDEN_SIZE = 8
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


# The Swift package's other scheduler kinds, built from SD 1.x's config as diffusers' from_config does
# (with SD 1.5's clip_sample false, which DDIM would otherwise default to true).
OTHER_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                    "ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler", "lcm": "LCMScheduler"}
NOISY_SCHEDULERS = {"euler_a": "scheduling_euler_ancestral_discrete", "lcm": "scheduling_lcm"}


def make_scheduler(name: str, prediction_type: str = "epsilon"):
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
    if name == "pndm":
        return PNDMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    if name == "dpmpp":
        config = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
        return DPMSolverMultistepScheduler(**config, prediction_type=prediction_type)
    if name in OTHER_SCHEDULERS:
        config = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type, clip_sample=False)
        return getattr(diffusers, OTHER_SCHEDULERS[name]).from_config(config)
    raise ValueError(f"unknown scheduler {name!r}")


class RandomStream:
    """Successive draws from one seeded source, like python_coreml_sd.generation.random_source:
    NumPy's legacy RandomState (the pipeline's source) or PyTorch's CPU generator."""

    def __init__(self, rng: str, seed: int):
        if rng not in ("numpy", "torch"):
            raise ValueError(f"unknown rng {rng!r}")
        self.rng = rng
        self._state = np.random.RandomState(seed) if rng == "numpy" else torch.Generator().manual_seed(seed)

    def normal(self, shape) -> np.ndarray:
        if self.rng == "numpy":
            return self._state.randn(*shape).astype(np.float32)
        return torch.randn(tuple(shape), generator=self._state).numpy()


def random_normal(rng: str, seed: int, shape) -> np.ndarray:
    """The first draw of a fresh source."""
    return RandomStream(rng, seed).normal(shape)


def encode_text(ids) -> np.ndarray:
    """Fake text encoder: (77,) token ids -> (77, HIDDEN_SIZE) float32."""
    out = np.empty((len(ids), HIDDEN_SIZE), dtype=np.float32)
    for i, token in enumerate(ids):
        for j in range(HIDDEN_SIZE):
            out[i, j] = np.float32(math.sin(0.001 * token * (j + 1) + 0.1 * i))
    return out


def embedding_mean(hidden: np.ndarray) -> float:
    """Mean in float64 over the sequence order, so both languages sum in the same order."""
    total = 0.0
    for value in hidden.reshape(-1):
        total += float(value)
    return total / hidden.size


def denoise(sample: np.ndarray, timestep: int, hidden: np.ndarray) -> np.ndarray:
    """Fake UNet for one batch item: 0.1*sample + per-channel constant from timestep and text."""
    mean = embedding_mean(hidden)
    out = np.empty_like(sample)
    for c in range(sample.shape[0]):
        bias = np.float32(0.01 * math.cos(timestep / 100.0) + 0.05 * (c + 1) * mean)
        out[c] = np.float32(0.1) * sample[c] + bias
    return out


def decode(z: np.ndarray) -> np.ndarray:
    """Fake VAE decoder: (4, h, w) latents already divided by 0.18215 -> (3, 8h, 8w) in [-1, 1].

    Scalar libm calls (not NumPy's SIMD loops) so Swift's libm gives the same float32 values."""
    small = np.empty((3,) + z.shape[1:], dtype=np.float32)
    for index in np.ndindex(small.shape):
        small[index] = np.float32(math.tanh(float(z[index]) * 0.02))
    return np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)


def encode_image(image: np.ndarray) -> np.ndarray:
    """Fake VAE encoder, the `latent` moments: (3, 8h, 8w) in [-1, 1] -> (8, h, w). Mean: the top-left pixel
    of each 8x8 block per channel plus their channel mean (unscaled); log-variance: mean - 5 (so std is
    about 0.05-0.14 and the posterior draw matters)."""
    c, height, width = image.shape
    pooled = image.reshape(c, height // 8, 8, width // 8, 8)[:, :, 0, :, 0]
    fourth = pooled.mean(axis=0, dtype=np.float64).astype(np.float32)[None]
    mean = np.concatenate([pooled, fourth]).astype(np.float32)
    return np.concatenate([mean, mean - np.float32(5)]).astype(np.float32)


def sample_latents(moments: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Scaled posterior draw, (8, h, w) moments + (4, h, w) noise -> (4, h, w): the formula of
    python_coreml_sd.generation.pipeline.sample_posterior, element by element with scalar libm calls
    (std in float64, rounded once), then times the latent scale."""
    mean, logvar = moments[:4], moments[4:]
    std = np.empty_like(logvar)
    for index in np.ndindex(logvar.shape):
        std[index] = np.float32(math.exp(0.5 * float(min(max(float(logvar[index]), -30.0), 20.0))))
    return (np.float32(LATENT_SCALE) * (mean + std * noise)).astype(np.float32)


def is_unsafe(image: np.ndarray) -> bool:
    """Fake safety checker: flags images whose mean brightness exceeds 0.9."""
    return float(image.astype(np.float64).mean()) > 0.9


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, as diffusers' numpy postprocessing does."""
    scaled = np.clip(image / np.float32(2) + np.float32(0.5), 0, 1) * np.float32(255)
    return np.round(scaled).astype(np.uint8).transpose(1, 2, 0)


def test_image_bytes(height: int, width: int) -> np.ndarray:
    """The deterministic img2img start image, (H, W, 3) uint8, computed with scalar libm calls."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for y, x, c in np.ndindex(pixels.shape):
        pixels[y, x, c] = round((math.sin(0.05 * x + 0.3 * c) * math.cos(0.07 * y) + 1) * 127.5)
    return pixels


def test_image(height: int, width: int) -> np.ndarray:
    """(3, H, W) in [-1, 1], as the pipeline preprocesses an 8-bit image: x / 127.5 - 1."""
    return (test_image_bytes(height, width).astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)


@dataclass
class LoopConfig:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 10
    guidance_scale: float = 7.5
    scheduler: str = "pndm"
    prediction_type: str = "epsilon"
    rng: str = "numpy"
    latent_size: int = 8
    strength: float | None = None  # set for img2img from test_image
    disable_safety: bool = False


@dataclass
class LoopResult:
    latents: np.ndarray
    rgb: np.ndarray
    unsafe: bool
    timesteps: list = field(default_factory=list)


def img2img_start(scheduler, steps: int, strength: float):
    """Index of the first timestep to run, as diffusers' img2img pipelines pick it."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0) * scheduler.order


def step_noise_from(rng: RandomStream, scheduler_name: str):
    """Ancestral steps draw their noise from the loop's own stream, right after the model call, as
    the Swift loop does (diffusers would draw it from a torch generator of its own)."""
    import contextlib
    import importlib
    from unittest import mock
    if scheduler_name not in NOISY_SCHEDULERS:
        return contextlib.nullcontext()
    module = importlib.import_module(f"diffusers.schedulers.{NOISY_SCHEDULERS[scheduler_name]}")
    return mock.patch.object(module, "randn_tensor", lambda shape, **_: torch.from_numpy(rng.normal(tuple(shape))))


def run_loop(config: LoopConfig, tokenize) -> LoopResult:
    """Text-to-image (or img2img) with the closed-form models; `tokenize(text) -> 77 ids`."""
    scheduler = make_scheduler(config.scheduler, config.prediction_type)
    scheduler.set_timesteps(config.steps)
    hidden = [encode_text(tokenize(config.negative_prompt)), encode_text(tokenize(config.prompt))]
    shape = (4, config.latent_size, config.latent_size)
    schedule = list(scheduler.timesteps)
    whole = not torch.is_floating_point(scheduler.timesteps)
    timesteps = [int(t) if whole else float(t) for t in schedule]
    rng = RandomStream(config.rng, config.seed)
    if config.strength is None:
        latents = rng.normal((1,) + shape)[0] * np.float32(scheduler.init_noise_sigma)
    else:
        start = img2img_start(scheduler, config.steps, config.strength)
        timesteps, schedule = timesteps[start:], schedule[start:]
        if hasattr(type(scheduler), "set_begin_index"):  # PNDM counts its own steps instead
            scheduler.set_begin_index(start)
        moments = encode_image(test_image(8 * config.latent_size, 8 * config.latent_size))
        diagonal_noise = rng.normal((1,) + shape)[0]  # drawn before noise, as the pipeline does
        noise = rng.normal((1,) + shape)[0]
        clean = sample_latents(moments, diagonal_noise)
        t = torch.tensor([timesteps[0]])
        latents = scheduler.add_noise(torch.from_numpy(clean)[None], torch.from_numpy(noise)[None], t)[0].numpy()
    # guidance <= 1 is the conditional prediction alone, as the pipelines (Swift and Python) and diffusers
    for t, step_t in zip(timesteps, schedule):
        model_input = scheduler.scale_model_input(torch.from_numpy(latents)[None], step_t)[0].numpy()
        uncond = denoise(model_input, t, hidden[0])
        cond = denoise(model_input, t, hidden[1])
        guided = (uncond + np.float32(config.guidance_scale) * (cond - uncond) if config.guidance_scale > 1
                  else cond)
        with step_noise_from(rng, config.scheduler):
            out = scheduler.step(torch.from_numpy(guided)[None], step_t if not whole else t,
                                 torch.from_numpy(latents)[None])
        latents = out.prev_sample[0].numpy().astype(np.float32)
    image = decode(latents / np.float32(LATENT_SCALE))
    unsafe = not config.disable_safety and is_unsafe(image)
    rgb = to_rgb8(np.zeros_like(image) - 1 if unsafe else image)
    return LoopResult(latents=latents, rgb=rgb, unsafe=unsafe, timesteps=timesteps)


class _Model:
    def __init__(self, predict):
        self.predict = predict


def model_set(latent_size: int = 8, unet_batch: int = 2):
    """The closed-form models behind python_coreml_sd.generation's component interface (names,
    shapes and layouts of the converted models), so the real pipeline can run them."""
    def text_encoder(input_ids):
        return (encode_text([int(v) for v in input_ids[0]])[None],)

    def unet(sample, timestep, encoder_hidden_states):
        hidden = text_from_unet_layout(encoder_hidden_states)  # (B, 77, C) order for the mean
        return (np.stack([denoise(x, float(t), h) for x, t, h in zip(sample, timestep, hidden)]),)

    dims = Dims(latent_size, latent_size, unet_batch, text_hidden=HIDDEN_SIZE)
    return _model_set({"text_encoder": text_encoder, "unet": unet, **VAE}, {"unet": dims}, SD)


# The VAE's closed forms behind its components' interfaces, SD's and SDXL's alike.
VAE = {"vae_decoder": lambda z: (decode(z[0])[None],), "vae_encoder": lambda x: (encode_image(x[0])[None],)}


def _model_set(predicts: dict, dims: dict, family: str, max_prompt_chunks: int = None):
    """A ModelSet of `predicts` (component -> compute), each at the table's shapes for its `dims` (else the
    UNet's); with `max_prompt_chunks`, the UNets take contexts of 1..max_prompt_chunks text-encoder windows."""
    from python_coreml_sd.generation.components import Component, ModelSet
    components = {}
    for name, compute in predicts.items():
        shapes = TABLE[name].input_shapes(dims.get(name, dims["unet"]), family)
        component = Component(_Model(_named(name, compute, family)), shapes)
        if max_prompt_chunks and name in ("unet", "refiner"):  # encoder_hidden_states (B, C, 1, S)
            batch, channels, _, length = shapes["encoder_hidden_states"]
            component.enumerated["encoder_hidden_states"] = [(batch, channels, 1, length * k)
                                                            for k in range(1, max_prompt_chunks + 1)]
        components[name] = component
    return ModelSet(components)


def _named(component: str, compute, family: str = SD):
    """`compute` behind the component's predict interface: {input name: array} -> {output name: array}."""
    io = TABLE[component].io(family)
    return lambda inputs: dict(zip(io.outputs, compute(*(inputs[name] for name in io.inputs))))


# SDXL (issue 16): two text encoders of their own widths and phases, the second's pooled embedding, and UNets
# taking the added conditions (time ids, pooled text embeds); the refiner's context is the second encoder's alone.
# swift/Tests/TestSupport/ClosedFormModels.swift (ClosedForm.XL...) implements the same formulas.
XL_WIDTHS = {"text_encoder": HIDDEN_SIZE, "text_encoder_2": 12}
XL_PHASES = {"text_encoder": 0.0, "text_encoder_2": 0.5}
XL_POOLED = 4
XL_GAINS = {"unet": 0.1, "refiner": 0.12}  # the refiner answers otherwise, so the hand-off shows in the latents


def encode_text_xl(ids, width: int, phase: float) -> np.ndarray:
    """Fake SDXL text encoder states: (S,) token ids -> (S, width) float32."""
    out = np.empty((len(ids), width), dtype=np.float32)
    for i, token in enumerate(ids):
        for j in range(width):
            out[i, j] = np.float32(math.sin(0.001 * token * (j + 1) + 0.1 * i + phase))
    return out


def pooled_xl(ids) -> np.ndarray:
    """Fake pooled text_embeds (XL_POOLED,) from the sum of the ids (padding included: it tells the pad tokens apart)."""
    total = sum(int(token) for token in ids)
    return np.asarray([math.cos(1e-5 * total * (j + 1)) for j in range(XL_POOLED)], dtype=np.float32)


def denoise_xl(sample: np.ndarray, timestep: float, hidden: np.ndarray, time_ids, text_embeds, gain: float):
    """Fake SDXL UNet for one batch item: gain * sample + a per-channel constant from the timestep, the text, the
    time ids (weighted by position) and the pooled embeds; sums in float64 in order, rounded once."""
    mean = embedding_mean(hidden)
    positional = 0.0
    for k, value in enumerate(np.asarray(time_ids).reshape(-1)):
        positional += (k + 1) * float(value)
    extra = 1e-4 * positional + 0.02 * embedding_mean(np.asarray(text_embeds))
    out = np.empty_like(sample)
    for c in range(sample.shape[0]):
        bias = np.float32(0.01 * math.cos(timestep / 100.0) + 0.05 * (c + 1) * mean + (c + 1) * extra)
        out[c] = np.float32(gain) * sample[c] + bias
    return out


def xl_model_set(latent_size: int = 8, max_prompt_chunks: int = 1, refiner: bool = True):
    """The SDXL closed-form models behind python_coreml_sd.generation's component interface (the table's SDXL
    names and shapes), so the real pipeline runs them: both encoders, the UNet, the refiner, the VAE decoder and
    encoder.
    The UNets take contexts of 1..max_prompt_chunks text-encoder windows."""
    def encoder(name):
        def compute(input_ids):
            ids = [int(v) for v in input_ids[0]]
            return encode_text_xl(ids, XL_WIDTHS[name], XL_PHASES[name])[None], pooled_xl(ids)[None]
        return compute

    def unet(name):
        def compute(sample, timestep, encoder_hidden_states, time_ids, text_embeds):
            hidden = text_from_unet_layout(encoder_hidden_states)
            return (np.stack([denoise_xl(x, float(t), h, ids, e, XL_GAINS[name])
                              for x, t, h, ids, e in zip(sample, timestep, hidden, time_ids, text_embeds)]),)
        return compute

    dims = {"unet": Dims(latent_size, latent_size, text_hidden=sum(XL_WIDTHS.values()), text_pooled=XL_POOLED)}
    dims["refiner"] = replace(dims["unet"], text_hidden=XL_WIDTHS["text_encoder_2"], time_ids=len(TIME_IDS["refiner"]))
    predicts = {"text_encoder": encoder("text_encoder"), "text_encoder_2": encoder("text_encoder_2"),
                "unet": unet("unet"), **VAE}
    if refiner:
        predicts["refiner"] = unet("refiner")
    return _model_set(predicts, dims, SDXL, max_prompt_chunks)


# ControlNet and inpainting (issue 19): ControlNets of one gain each answering two residuals, the controlled UNet
# adding them to `denoise`, and a 9-channel inpainting UNet. ClosedFormControl in the Swift stand-ins is the same.
def control_residuals(sample, timestep: float, hidden, cond, gain: float) -> tuple:
    """One batch item: (C, h, w) gain * sample + 0.01 cond[c mod 3] at each 8 x 8 block's top-left pixel, and
    (C, 1, 1) gain * mean(cond) + 0.001 cos(t / 100) + 0.02 mean(text)."""
    first = np.float32(gain) * sample + np.float32(0.01) * cond[np.arange(sample.shape[0]) % 3, ::8, ::8]
    constant = np.float32(0.001 * math.cos(timestep / 100.0) + 0.02 * embedding_mean(hidden))
    second = np.float32(gain) * np.float32(embedding_mean(cond)) + constant
    return first.astype(np.float32), np.full((sample.shape[0], 1, 1), second, np.float32)


def controlled_denoise(sample, timestep: float, hidden, first, second) -> np.ndarray:
    return denoise(sample, timestep, hidden) + np.float32(0.5) * first + np.float32(0.1) * second


def inpaint_denoise(sample, timestep: float, hidden) -> np.ndarray:
    """`denoise` of the latents + 0.1 mask + 0.05 masked-image latents, channel by channel."""
    return denoise(sample[:4], timestep, hidden) + np.float32(0.1) * sample[4:5] + np.float32(0.05) * sample[5:]


def control_model_set(latent_size: int = 8, gains=(), inpaint: bool = False):
    """model_set with ControlNets of `gains` (keys controlnet_0, ...) and the controlled UNet, or with the 9-channel
    inpainting UNet; the real pipeline runs them."""
    from python_coreml_sd.components import RESIDUAL
    from python_coreml_sd.generation.components import Component, controlnet_key
    models = model_set(latent_size)
    dims = replace(Dims(latent_size, latent_size, text_hidden=HIDDEN_SIZE, inpaint=inpaint),
                   residuals=((4, latent_size, latent_size), (4, 1, 1)))
    names = (RESIDUAL.format(0), RESIDUAL.format(1))

    def per_item(compute, inputs, *more):
        hidden = text_from_unet_layout(inputs["encoder_hidden_states"])
        return [compute(x, float(t), h, *rest) for x, t, h, *rest in
                zip(inputs["sample"], inputs["timestep"], hidden, *(inputs[name] for name in more))]

    if inpaint:
        unet = lambda inputs: {"noise_pred": np.stack(per_item(inpaint_denoise, inputs))}
        models.components["unet"] = Component(_Model(unet), TABLE["unet"].input_shapes(dims))
        return models
    controlled = lambda inputs: {"noise_pred": np.stack(per_item(controlled_denoise, inputs, *names))}
    models.components["unet"] = Component(_Model(controlled), TABLE["control-unet"].input_shapes(dims))
    for i, gain in enumerate(gains):
        def net(inputs, gain=gain):
            items = per_item(lambda *args: control_residuals(*args, gain), inputs, "controlnet_cond")
            return {name: np.stack([item[k] for item in items]) for k, name in enumerate(names)}
        models.components[controlnet_key(i)] = Component(_Model(net), TABLE["controlnet"].input_shapes(dims))
    return models
