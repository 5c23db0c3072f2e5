"""sdrun's IP-Adapter attention processor against diffusers' IPAdapterAttnProcessor2_0 on the CPU, where the
kernel cannot run: the kernel call is swapped for the fp32 reference attention of the same signature, so these
tests check the processor's own arithmetic (scales, the split into text and image tokens, several adapters)
and that the kernel ends on every module whichever comes last, the IP-Adapter or the install.
tests/test_gpu_ip_adapter.py runs the real kernel."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from PIL import Image
from sd_layout import write_ip_adapter

from sdrun import adapters, ip_adapter, models
from sdrun.ops import processor
from sdrun.ops.processor import SdrunAttnProcessor, SdrunIPAdapterAttnProcessor, install
from sdrun.ops.reference import reference_attention


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setattr(processor, "memory_efficient_attention", reference_attention)


def random_ip_module(scales=(0.7, 0.3), tokens=(4, 6)):
    """An SD-shaped cross-attention module (8 heads of 8) and diffusers' processor for two IP-Adapters."""
    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=8, dim_head=8).eval()
    trained = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, num_tokens=tokens, scale=list(scales))
    for layer in [*trained.to_k_ip, *trained.to_v_ip]:
        torch.nn.init.normal_(layer.weight, std=0.3)
    hidden = torch.randn(2, 16, 64)
    states = (torch.randn(2, 7, 32), [torch.randn(2, n, 32) for n in tokens])
    return attn, trained, hidden, states


@pytest.mark.parametrize("scales", [(0.7, 0.3), (0.0, 1.5), (0.0, 0.0)])
def test_ip_processor_equals_diffusers_on_random_inputs(reference_kernel, scales):
    attn, trained, hidden, states = random_ip_module(scales)
    ours = SdrunIPAdapterAttnProcessor(trained, compute_dtype=torch.float32)
    with torch.no_grad():
        expected = trained(attn, hidden, states)
        torch.testing.assert_close(ours(attn, hidden, states), expected, atol=1e-5, rtol=1e-5)
        text_only = SdrunAttnProcessor(torch.float32)(attn, hidden, states[0])
    assert torch.equal(ours(attn, hidden, states), text_only) == (scales == (0.0, 0.0))  # the image term counts
    assert ours.to_k_ip[1].weight is trained.to_k_ip[1].weight and ours.to_v_ip is trained.to_v_ip  # not copies
    assert ours.num_tokens is trained.num_tokens and ours.scale is trained.scale


def test_ip_processor_leaves_masked_calls_to_diffusers(monkeypatch):
    attn, trained, hidden, states = random_ip_module()
    mask = torch.zeros(2, 1, 7)
    mask[..., 5:] = -1e4  # the last two text tokens are masked out

    def no_kernel(*_args):
        raise AssertionError("the kernel takes no masks: a masked call must not reach it")

    monkeypatch.setattr(processor, "memory_efficient_attention", no_kernel)
    with torch.no_grad():
        ours = SdrunIPAdapterAttnProcessor(trained)(attn, hidden, states, attention_mask=mask)
        torch.testing.assert_close(ours, trained(attn, hidden, states, attention_mask=mask), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- in a pipeline

@pytest.fixture(scope="module")
def ip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "red.png")
    path = write_ip_adapter(folder, models.build_tiny().unet)
    return adapters.Adapters(ip_adapter=str(path), ip_image=str(folder / "red.png"))


def noise_prediction(pipe, ip: adapters.Adapters) -> torch.Tensor:
    torch.manual_seed(3)
    latents, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        embeds = ip_adapter.image_embeds(pipe, ip, 1, False, "cpu")
        return pipe.unet(latents, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds}).sample


def on_kernel(pipe) -> dict:
    """Every UNet attention module's processor class name, by how many modules use it."""
    names = [type(module.processor).__name__ for module in pipe.unet.modules() if isinstance(module, Attention)]
    return {name: names.count(name) for name in names}


def test_every_unet_attention_module_ends_on_the_kernel_in_either_order(reference_kernel, ip_files):
    adapter_first = models.build_tiny()
    ip_adapter.load(adapter_first, ip_files, adapters.LOAD_ERRORS)
    expected = noise_prediction(adapter_first, ip_files)  # diffusers' processors, fp32 PyTorch attention
    parameters = [id(p) for p in adapter_first.unet.parameters()]
    report = install(adapter_first)
    assert [id(p) for p in adapter_first.unet.parameters()] == parameters  # the trained weights themselves
    # the tiny UNet's four transformer blocks: self-attention (attn1) and the IP-Adapter's cross-attention (attn2)
    assert on_kernel(adapter_first) == {"SdrunAttnProcessor": 4, "SdrunIPAdapterAttnProcessor": 4}
    assert report.image_modules == 4 and report.summary().endswith(", 4 of them IP-Adapter modules with their image attention")

    kernel_first = models.build_tiny()
    install(kernel_first)
    ip_adapter.load(kernel_first, ip_files, adapters.LOAD_ERRORS)  # diffusers sets its processors: installed again
    assert on_kernel(kernel_first) == on_kernel(adapter_first)
    assert kernel_first.sdrun_kernel.report == report  # the pipeline's report is the latest install's

    first, second = noise_prediction(adapter_first, ip_files), noise_prediction(kernel_first, ip_files)
    assert torch.equal(first, second)
    scale = expected.abs().max()
    assert (first - expected).abs().max() / scale < 1e-2  # attention computed in fp16, as on the GPU
    adapter_first.set_ip_adapter_scale(0.0)  # diffusers' own setter reaches sdrun's processor
    assert (noise_prediction(adapter_first, ip_files) - expected).abs().max() / scale > 0.05  # the image counted


def test_a_module_with_another_processor_is_named_with_the_reason():
    pipe = models.build_tiny()
    odd = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    odd.set_processor(type("CustomProcessor", (AttnProcessor2_0,), {})())
    report = install(pipe)
    assert ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2", "it uses the CustomProcessor processor") \
        in report.left_on_sdpa
    assert report.summary().endswith("stays on PyTorch SDPA: it uses the CustomProcessor processor")


def test_info_says_which_attention_runs_on_the_kernel(sdrun):
    result = sdrun("info", "--no-selftest")
    assert result.exit_code == 0, result
    text = " ".join(result.stdout.split())  # the table wraps long values
    assert "kernel attention every self- and cross-attention module of the UNet, an IP-Adapter's included" in text
    assert "left on PyTorch SDPA: modules whose head_dim is over 256" in text
    assert ("kernel group norm every GroupNorm of the UNet and the VAE: a ResNet block's two and the output norms "
            "fused") in text

