"""IP-Adapter under --xformers on a GPU (issue 11): whichever comes last, the adapter or the kernel, every UNet
attention module runs on sdrun's kernel (the IP-Adapter's text and image attention included), and the output
matches PyTorch attention's. The UNet is SD 1.5-shaped (head_dim 40 and 80, 768-wide cross-attention) with random
weights; the IP-Adapter is random too, written in h94/IP-Adapter's file layout."""

import numpy as np
import pytest
import torch
from conftest import TINY, pixels
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from PIL import Image
from sd_layout import write_ip_adapter

from sdrun import adapters, ip_adapter, models, ops
from sdrun.ops.processor import SdrunAttnProcessor, SdrunIPAdapterAttnProcessor, install

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def kernel():
    ops.load()


def sd15_shaped_pipe():
    """The tiny pipeline around an SD 1.5-shaped two-level UNet, in fp16 on the CPU (where a run loads it)."""
    pipe = models.build_tiny()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8)
    pipe.register_modules(unet=unet)
    return pipe.to(dtype=torch.float16)


@pytest.fixture(scope="module")
def ip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "red.png")
    path = write_ip_adapter(folder, sd15_shaped_pipe().unet)
    return adapters.Adapters(ip_adapter=str(path), ip_image=str(folder / "red.png"))


def noise_prediction(pipe, ip) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 32, 32, generator=generator).to("cuda", torch.float16)
    text = torch.randn(2, 77, 768, generator=generator).to("cuda", torch.float16)
    with torch.no_grad():
        embeds = ip_adapter.image_embeds(pipe, ip, 1, True, "cuda")  # guidance: unconditional and conditional
        return pipe.unet(latents, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds}).sample


def with_adapter(ip, kernel: str | None):
    """The pipeline with the IP-Adapter, and the kernel installed before it, after it, or not at all."""
    pipe = sd15_shaped_pipe()
    if kernel == "before":
        install(pipe)
    ip_adapter.load(pipe, ip, adapters.LOAD_ERRORS)
    if kernel == "after":
        install(pipe)
    return pipe.to("cuda")


@pytest.mark.parametrize("kernel_installed", ["before", "after"])
def test_every_attention_module_is_on_the_kernel_and_matches_pytorch(kernel, ip_files, kernel_installed):
    reference = with_adapter(ip_files, None)
    expected = noise_prediction(reference, ip_files)
    pipe = with_adapter(ip_files, kernel_installed)
    report = pipe.sdrun_kernel.report  # the latest install's: with the kernel first, the one loading the adapter ran
    print(report.summary())
    modules = [(name, module) for name, module in pipe.unet.named_modules() if isinstance(module, Attention)]
    cross = [name for name, _ in modules if name.endswith("attn2")]
    assert {name for name, module in modules if isinstance(module.processor, SdrunIPAdapterAttnProcessor)} == set(cross)
    assert all(type(module.processor) is SdrunAttnProcessor for name, module in modules if name not in cross)
    assert not [name for name, _ in report.left_on_sdpa if name.startswith("unet.")]
    assert report.image_modules == len(cross)

    out = noise_prediction(pipe, ip_files)
    error = (out.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    print(f"max abs difference {error:.3e}, output scale {scale:.3e}")
    assert torch.isfinite(out).all() and error / scale < 1e-2
    reference.set_ip_adapter_scale(0.0)
    image_effect = (noise_prediction(reference, ip_files).float() - expected.float()).abs().max().item()
    assert image_effect > 10 * error  # the image attention counts: the comparison above sees it


def test_cli_xformers_with_an_ip_adapter_reports_it_and_matches_pytorch(sdrun, tmp_path):
    adapter = write_ip_adapter(tmp_path, models.build_tiny().unet)
    Image.new("RGB", (40, 40), (200, 30, 30)).save("red.png")
    args = ("a fox", *TINY, "--seed", "4", "--fp16", "--ip-adapter", adapter, "--ip-image", "red.png")
    plain = sdrun(*args, "-o", "plain.png")
    kernel = sdrun(*args, "--xformers", "-o", "kernel.png")
    assert plain.exit_code == 0 and kernel.exit_code == 0, kernel
    assert "4 of them IP-Adapter modules with their image attention" in kernel.stderr, kernel
    assert "stay on PyTorch SDPA" not in kernel.stderr and "stays on PyTorch SDPA" not in kernel.stderr
    assert np.abs(pixels("plain.png") - pixels("kernel.png")).mean() < 0.02
