"""Small real architectures (transformers CLIP, diffusers VAE / UNet / safety checker, a Neural-
Engine-style attention block) converted by coremltools in fp32 and fp16 and run by MILModel;
outputs compared with the PyTorch fp32 module by PSNR (Apple's definition)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mil_test_utils import convert, numpy_inputs, reference
from python_coreml_sd.components import text_to_unet_layout
from python_coreml_sd.layers.unet import DiffusersUNet
from python_coreml_sd.metrics import psnr
from python_coreml_sd.runtime.mil import MILModel

THRESHOLD = {"fp32": 60.0, "fp16": 35.0}
UNET_FP16_THRESHOLD = 40.0


def check(module, example_inputs, names, tmp_path, precision, target="macOS13", threshold=None):
    """Converts, runs on CPU, returns the PSNR of every output; asserts each meets the threshold."""
    path = convert(module, example_inputs, names, tmp_path / f"m_{precision}.mlpackage", precision, target)
    model = MILModel(path)
    outputs = list(model.predict(numpy_inputs(names, example_inputs)).values())
    refs = reference(module, example_inputs)
    values = [psnr(r, o) for r, o in zip(refs, outputs)]
    limit = threshold or THRESHOLD[precision]
    print(f"PSNR {type(module).__name__} {precision} {target}: " + ", ".join(f"{v:.1f} dB" for v in values))
    assert len(outputs) == len(refs)
    for r, o in zip(refs, outputs):
        assert o.shape == r.shape
    assert min(values) >= limit, f"PSNR {values} below {limit} dB ({precision}, ops {dict(model.op_types)})"
    return values


# ---- text encoder ----------------------------------------------------------------------------

class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, return_dict=False)
        return out[0], out[1]


def tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=16, hidden_act="quick_gelu")
    return CLIPTextModel(config).eval()


@pytest.mark.parametrize("precision,target", [("fp32", "macOS13"), ("fp16", "macOS13"), ("fp16", "iOS18")])
def test_clip_text_model(precision, target, tmp_path):
    ids = torch.randint(0, 999, (1, 16))
    ids[0, 10] = 999  # the pooled output reads the position of the highest id (EOS)
    check(TextEncoder(tiny_clip_text()), (ids,), ["input_ids"], tmp_path, precision, target)


# ---- VAE -------------------------------------------------------------------------------------

def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32).eval()


class Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


class Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latent_dist.mean


@pytest.mark.parametrize("precision,target", [("fp32", "macOS13"), ("fp16", "macOS13"), ("fp16", "iOS18")])
def test_vae_decoder(precision, target, tmp_path):
    # iOS18: the mid-block attention becomes one scaled_dot_product_attention op
    check(Decoder(tiny_vae()), (torch.randn(1, 4, 16, 16),), ["z"], tmp_path, precision, target)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vae_encoder(precision, tmp_path):
    check(Encoder(tiny_vae()), (torch.rand(1, 3, 32, 32) * 2 - 1,), ["x"], tmp_path, precision)


# ---- UNet ------------------------------------------------------------------------------------

UNet = DiffusersUNet  # positional inputs, tensor output: what tracing needs


def tiny_unet(sd2=False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    if sd2:  # SD 2.x: linear projections, per-block head dims, a context wider than the blocks
        return UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    use_linear_projection=True).eval()
    return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4).eval()


def unet_inputs(context_dim):
    torch.manual_seed(1)
    return torch.randn(2, 4, 8, 8), torch.tensor([981.0, 981.0]), text_to_unet_layout(torch.randn(2, 7, context_dim))


@pytest.mark.parametrize("precision,target", [("fp32", "macOS13"), ("fp16", "macOS13"), ("fp16", "iOS18")])
def test_unet_sd1(precision, target, tmp_path):
    threshold = UNET_FP16_THRESHOLD if precision == "fp16" else None
    check(UNet(tiny_unet()), unet_inputs(32), ["sample", "timestep", "encoder_hidden_states"], tmp_path,
          precision, target, threshold)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_unet_sd2_like(precision, tmp_path):
    threshold = UNET_FP16_THRESHOLD if precision == "fp16" else None
    check(UNet(tiny_unet(sd2=True)), unet_inputs(64), ["sample", "timestep", "encoder_hidden_states"], tmp_path,
          precision, "macOS13", threshold)


# ---- safety checker --------------------------------------------------------------------------

class SafetyScores(torch.nn.Module):
    """diffusers' StableDiffusionSafetyChecker scoring, in tensor ops only (its forward branches in
    Python): filtered images, special-care scores and concept scores."""

    def __init__(self, checker):
        super().__init__()
        self.c = checker

    def forward(self, clip_input, images):
        c = self.c
        embeds = F.normalize(c.visual_projection(c.vision_model(clip_input)[1]))
        special = embeds @ F.normalize(c.special_care_embeds).T - c.special_care_embeds_weights
        concept = embeds @ F.normalize(c.concept_embeds).T - c.concept_embeds_weights
        concept = concept + (special > 0).any(dim=1, keepdim=True).float() * 0.01
        keep = 1.0 - (concept > 0).any(dim=1).float()
        return images * keep[:, None, None, None], special, concept


def tiny_safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=1000, max_position_embeddings=16),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # random embeddings, so that some scores land on each side of 0
        checker.concept_embeds_weights.uniform_(-0.3, 0.3)
        checker.special_care_embeds_weights.uniform_(-0.3, 0.3)
    return checker


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_safety_checker(precision, tmp_path):
    torch.manual_seed(2)
    inputs = (torch.randn(1, 3, 32, 32), torch.rand(1, 16, 16, 3))
    check(SafetyScores(tiny_safety_checker()), inputs, ["clip_input", "images"], tmp_path, precision)


# ---- Neural-Engine-style layers --------------------------------------------------------------

class ANEBlock(torch.nn.Module):
    """(B, C, 1, S) layout: 1x1 convs for linears, channel-axis layer norm, per-head einsum
    attention with split/concat, a transpose and reshape."""

    def __init__(self, channels=32, heads=4, context=24):
        super().__init__()
        self.heads = heads
        self.norm_w = torch.nn.Parameter(torch.randn(channels))
        self.norm_b = torch.nn.Parameter(torch.randn(channels))
        self.q = torch.nn.Conv2d(channels, channels, 1, bias=False)
        self.k = torch.nn.Conv2d(context, channels, 1, bias=False)
        self.v = torch.nn.Conv2d(context, channels, 1, bias=False)
        self.out = torch.nn.Conv2d(channels, channels, 1)

    def layer_norm(self, x):
        centered = x - x.mean(dim=1, keepdim=True)
        var = (centered * centered).mean(dim=1, keepdim=True)
        return centered * torch.rsqrt(var + 1e-5) * self.norm_w.view(1, -1, 1, 1) + self.norm_b.view(1, -1, 1, 1)

    def forward(self, x, ctx):
        b, c, h, w = x.shape
        seq = x.reshape(b, c, 1, h * w)
        hs = self.layer_norm(seq)
        ctx = ctx.transpose(1, 2).unsqueeze(2)  # (B, S, D) -> (B, D, 1, S)
        q, k, v = self.q(hs) * (c // self.heads) ** -0.5, self.k(ctx), self.v(ctx)
        k = k.transpose(1, 3)
        outs = []
        for qh, kh, vh in zip(q.split(c // self.heads, 1), k.split(c // self.heads, 3), v.split(c // self.heads, 1)):
            weights = torch.einsum("bchq,bkhc->bkhq", qh, kh).softmax(dim=1)
            outs.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
        attn = self.out(torch.cat(outs, dim=1)) + seq
        return attn.reshape(b, c, h, w)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ane_style_block(precision, tmp_path):
    torch.manual_seed(0)
    check(ANEBlock().eval(), (torch.randn(2, 32, 4, 4), torch.randn(2, 7, 24)), ["x", "ctx"], tmp_path, precision)


def test_fp16_program_keeps_fp16_interface(tmp_path):
    module = Decoder(tiny_vae())
    path = convert(module, (torch.randn(1, 4, 16, 16),), ["z"], tmp_path / "d.mlpackage", "fp16", "iOS16")
    model = MILModel(path)
    desc = model.input_description["z"]
    assert desc.shape == (1, 4, 16, 16)
    out = model.predict({"z": np.random.default_rng(0).normal(size=desc.shape).astype(desc.dtype)})
    (name, value), = out.items()
    assert value.dtype == model.output_description[name].dtype
