"""The Neural-Engine UNet (PyTorch) against diffusers' UNet2DConditionModel in fp32."""
import pytest
import torch

from python_coreml_sd.errors import UserError
from python_coreml_sd.layers import ATTENTION_IMPLEMENTATIONS, LayerNormANE
from python_coreml_sd.layers.attention import batched_attention, split_einsum_attention
from python_coreml_sd.components import text_to_unet_layout
from python_coreml_sd.layers.unet import UNet2DConditionModelANE, from_diffusers
from python_coreml_sd.metrics import psnr

from .conftest import tiny_config


def random_inputs(config, batch=2, size=16, seq=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], size, size, generator=generator)
    timestep = torch.tensor([981.0, 1.0][:batch])
    context = torch.randn(batch, seq, config["cross_attention_dim"], generator=generator)
    return sample, timestep, context


@pytest.mark.parametrize("config_name", ["tiny", "sd2_like"])
@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
def test_matches_diffusers_fp32(unets, config_name, implementation):
    unet = unets[config_name]
    sample, timestep, context = random_inputs(unet.config)
    # query_chunk=48 makes SPLIT_EINSUM_V2 chunk the 256- and 64-token sequences of a 16x16 latent
    ane = from_diffusers(unet, implementation, query_chunk=48)
    with torch.no_grad():
        reference = unet(sample, timestep, context).sample
        output = ane(sample, timestep, text_to_unet_layout(context))
    assert reference.abs().max() > 0.1  # a dead network would match trivially
    assert psnr(reference.numpy(), output.numpy()) >= 80


def test_scalar_timestep_broadcasts_over_the_batch(unets):
    unet = unets["tiny"]
    sample, _, context = random_inputs(unet.config)
    ane = from_diffusers(unet, "SPLIT_EINSUM")
    with torch.no_grad():
        expected = unet(sample, torch.tensor([500.0, 500.0]), context).sample
        output = ane(sample, torch.tensor([500.0]), text_to_unet_layout(context))
    assert psnr(expected.numpy(), output.numpy()) >= 80


def test_linear_weights_load_as_1x1_convs(unets):
    unet = unets["sd2_like"]
    ane = from_diffusers(unet, "ORIGINAL")
    proj_in = unet.down_blocks[0].attentions[0].proj_in
    assert proj_in.weight.dim() == 2  # SD 2.x: a linear layer
    loaded = ane.down_blocks[0].attentions[0].proj_in.weight
    assert loaded.shape == (*proj_in.weight.shape, 1, 1)
    assert torch.equal(loaded[:, :, 0, 0], proj_in.weight)


def test_missing_or_unexpected_weights_fail_loudly(unets):
    state = unets["tiny"].state_dict()
    state.pop("conv_out.bias")
    model = UNet2DConditionModelANE(dict(unets["tiny"].config))
    with pytest.raises(RuntimeError, match="conv_out.bias"):
        model.load_state_dict(state)


def test_layer_norm_over_channels_matches_torch_layer_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 1, 9) * 3 + 1
    ane = LayerNormANE(24)
    ref = torch.nn.LayerNorm(24)
    with torch.no_grad():
        weight, bias = torch.randn(24), torch.randn(24)
        for norm in (ane, ref):
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
        expected = ref(x.squeeze(2).transpose(1, 2)).transpose(1, 2).unsqueeze(2)
        assert torch.allclose(ane(x), expected, atol=1e-5)


@pytest.mark.parametrize("query_chunk", [None, 5, 64])
def test_split_einsum_equals_batched_attention(query_chunk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 1, 20), torch.randn(2, 16, 1, 11), torch.randn(2, 16, 1, 11)
    expected = batched_attention(q, k, v, heads=4)
    assert torch.allclose(split_einsum_attention(q, k, v, heads=4, query_chunk=query_chunk), expected, atol=1e-6)


@pytest.mark.parametrize("query_chunks", [1, 4, 20])
def test_split_einsum_in_equal_query_chunks_equals_batched_attention(query_chunks):
    """SPLIT_EINSUM_V2 at several latent sizes: the queries cut in `query_chunks` equal chunks by a reshape."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 1, 20), torch.randn(2, 16, 1, 11), torch.randn(2, 16, 1, 11)
    expected = batched_attention(q, k, v, heads=4)
    assert torch.allclose(split_einsum_attention(q, k, v, heads=4, query_chunks=query_chunks), expected, atol=1e-6)


@pytest.mark.parametrize("lengths, chunks", [
    ((256,), 1), ((4096,), 8), ((256, 1536), 4),  # none over 512 queries, each count divided evenly
    ((4096, 6144), 16), ((4096, 3840), 8), ((1024, 768, 960), 2),
    ((16, 17424), None),  # gcd 16, but 35 chunks needed for 17424: no shared number
])
def test_shared_query_chunks(lengths, chunks):
    from python_coreml_sd.layers.attention import shared_query_chunks
    assert shared_query_chunks(lengths) == chunks
    if chunks:
        assert all(n % chunks == 0 and n // chunks <= 512 for n in lengths)


@pytest.mark.parametrize("change", [{"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"]},
                                    {"time_embedding_type": "fourier"}, {"class_embed_type": "timestep"}])
def test_unsupported_configs_are_user_errors(change):
    config = {**tiny_config(), **change}
    with pytest.raises(UserError, match="not supported"):
        UNet2DConditionModelANE(config)


@pytest.mark.slow
def test_full_size_sd1_matches_diffusers_fp32():
    from python_coreml_sd import registry
    from .conftest import build_unet
    unet = build_unet(registry.family("sd1")["architecture"]["unet"])
    sample, timestep, context = random_inputs(unet.config, size=32, seq=77)
    ane = from_diffusers(unet, "SPLIT_EINSUM")
    with torch.no_grad():
        reference = unet(sample, timestep, context).sample
        output = ane(sample, timestep, text_to_unet_layout(context))
    assert psnr(reference.numpy(), output.numpy()) >= 80
