"""sdrun's GroupNorm (+ SiLU) kernel (csrc/group_norm.cu) against a float32 reference, and its place in the UNet.

GPU (marked `cuda`): fresh random inputs with a mean far from zero (the case where a sum of squares cancels), SD's
shapes in NCHW and channels-last (one resident launch, and three for a batch too large for that), every dtype,
weights in the input's dtype or float32 or absent, a per-channel addition (the time embedding), the binding's
refusals, CUDA graph capture, the UNet and the VAE with the kernel against them without it, and a tiled decode
(shared statistics, seen through a TorchFunctionMode) unchanged by it.
CPU: the UNet and the VAE with `install_fused_norms` compute what diffusers' own blocks compute (there `group_norm`
is PyTorch's), within float32 rounding: conv1's bias is added with the time embedding, in another order.
"""

import pytest
import torch
import torch.nn.functional as F

import sdrun.ops as ops
from sd_layout import tiny_unet, tiny_unet_inputs
from sdrun.ops import norms

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(x, groups, weight, bias, eps, silu, channel_add=None):
    x = x.double() if channel_add is None else x.double() + channel_add.double()[:, :, None, None]
    y = F.group_norm(x, groups, None if weight is None else weight.double(),
                     None if bias is None else bias.double(), eps)
    return (F.silu(y) if silu else y).float()


def inputs(shape, dtype, channels_last, seed, offset=3.0):
    generator = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", generator=generator) * 2 + offset  # mean 3, std 2: no trivial cancel
    channels = shape[1]
    weight = torch.randn(channels, device="cuda", generator=generator) + 1
    bias = torch.randn(channels, device="cuda", generator=generator)
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight, bias


TOLERANCE = {torch.float16: 1.5e-2, torch.bfloat16: 8e-2, torch.float32: 2e-4}  # a few units of the last place


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (32, 320, 64, 64),
                                   (1, 128, 96, 80), (3, 64, 5, 8), (2, 1280, 17, 24)])
@pytest.mark.parametrize("silu", [True, False])
def test_kernel_matches_the_float32_reference(dtype, channels_last, shape, silu):
    ops.load()
    x, weight, bias = inputs(shape, dtype, channels_last, seed=sum(shape))
    if dtype != torch.float32:
        weight, bias = weight.to(dtype), bias.to(dtype)
    assert norms.kernel_takes(x)
    y = norms.group_norm(x, 32, weight, bias, 1e-5, silu)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = reference(x, 32, weight, bias, 1e-5, silu)
    error = (y.float() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item() / 4), error


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 8, 8), (3, 64, 5, 8)])
def test_a_per_channel_addition_is_added_before_the_statistics(dtype, channels_last, shape):
    ops.load()
    x, weight, bias = inputs(shape, dtype, channels_last, seed=sum(shape) + 1)
    generator = torch.Generator("cuda").manual_seed(len(shape))
    add = (torch.randn(shape[:2], device="cuda", generator=generator) * 4).to(dtype)  # unlike x: shifts each group
    weight, bias = weight.to(dtype), bias.to(dtype)
    y = norms.group_norm(x, 32, weight, bias, 1e-5, True, add)
    expected = reference(x, 32, weight, bias, 1e-5, True, add)
    error = (y.float() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item() / 4), error
    without = reference(x, 32, weight, bias, 1e-5, True)
    assert (without - expected).abs().max().item() > 50 * TOLERANCE[dtype]  # the addition did change the result


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_addition_is_read_where_it_lies(channels_last):
    """The binding reads the addition's rows where they lie: a column slice of a wider matrix (the packed time
    projections) or one row for every image (stride 0): the same norm as from a dense copy, without the copy."""
    ops.load()
    x, weight, bias = inputs((3, 320, 16, 16), torch.float16, channels_last, seed=11)
    generator = torch.Generator("cuda").manual_seed(11)
    wide = (torch.randn(3, 960, device="cuda", generator=generator) * 4).half()
    one_row = wide[0, 320:640].expand(3, -1)
    group_norm = ops._ext.get().group_norm
    for add in (wide[:, 320:640], one_row):
        assert not add.is_contiguous()
        y = group_norm(x, 32, weight.half(), bias.half(), 1e-5, True, add)
        assert torch.equal(y, group_norm(x, 32, weight.half(), bias.half(), 1e-5, True, add.contiguous()))
    expected = reference(x, 32, weight.half(), bias.half(), 1e-5, True, one_row)
    error = (y.float() - expected).abs().max().item()
    assert error <= TOLERANCE[torch.float16] * max(1.0, expected.abs().max().item() / 4), error
    with pytest.raises(RuntimeError, match="channels must be dense"):
        group_norm(x, 32, None, None, 1e-5, False, wide[:, 0:640:2])
    with pytest.raises(RuntimeError, match="row stride a multiple of 8"):
        group_norm(x, 32, None, None, 1e-5, False, torch.zeros(3, 324, device="cuda", dtype=torch.float16)[:, :320])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_weights_no_weights_and_a_large_offset(channels_last):
    ops.load()
    x, weight, bias = inputs((2, 320, 32, 32), torch.float16, channels_last, seed=5, offset=200.0)  # mean 200, std 2
    for w, b in ((weight, bias), (None, None)):
        y = norms.group_norm(x, 32, w, b, 1e-6, True)
        expected = reference(x, 32, w, b, 1e-6, True)
        assert (y.float() - expected).abs().max().item() < 0.05  # fp16 input rounding at 200 is 0.125: of std 2


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("silu", [True, False])
def test_a_channels_last_batch_too_large_to_be_resident_takes_three_launches(silu):
    """The resident kernel keeps at most two blocks an SM and one image a block at least: a batch of more images
    than twice the SMs takes the three-launch path, which must compute the same norm."""
    ops.load()
    batch = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 1
    x, weight, bias = inputs((batch, 64, 4, 8), torch.float16, True, seed=batch)
    generator = torch.Generator("cuda").manual_seed(3)
    add = (torch.randn(batch, 64, device="cuda", generator=generator) * 4).half()
    y = norms.group_norm(x, 32, weight.half(), bias.half(), 1e-5, silu, add)
    expected = reference(x, 32, weight.half(), bias.half(), 1e-5, silu, add)
    error = (y.float() - expected).abs().max().item()
    assert error <= TOLERANCE[torch.float16] * max(1.0, expected.abs().max().item() / 4), error


@cuda
@pytest.mark.cuda
def test_the_binding_refuses_what_it_cannot_compute():
    ops.load()
    group_norm = ops._ext.get().group_norm
    x = torch.randn(2, 320, 7, 7, device="cuda", dtype=torch.float16)  # 49 pixels: not a multiple of 8
    assert not norms.kernel_takes(x)
    with pytest.raises(RuntimeError, match="pixels .* must be a multiple of 8"):
        group_norm(x, 32, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="multiple of groups"):
        group_norm(torch.randn(2, 30, 8, 8, device="cuda", dtype=torch.float16), 32, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="must have shape"):
        group_norm(torch.randn(2, 64, 8, 8, device="cuda"), 32, torch.ones(32, device="cuda"), None, 1e-5, False)
    x8 = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="channel_add must have shape"):
        group_norm(x8, 32, None, None, 1e-5, False, torch.zeros(2, 64, 1, 1, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="in x's dtype"):
        group_norm(x8, 32, None, None, 1e-5, False, torch.zeros(2, 64, device="cuda"))
    expected = reference(x, 32, None, None, 1e-5, True)  # the wrapper sends it to PyTorch instead
    assert (norms.group_norm(x, 32, None, None, 1e-5, True).float() - expected).abs().max().item() < 1.5e-2


@cuda
@pytest.mark.cuda
def test_captured_in_a_cuda_graph():
    ops.load()
    x, weight, bias = inputs((2, 640, 32, 32), torch.float16, True, seed=9)
    weight, bias = weight.half(), bias.half()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        norms.group_norm(x, 32, weight, bias, 1e-5, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = norms.group_norm(x, 32, weight, bias, 1e-5, True)
    x.copy_(torch.randn_like(x) * 3 - 1)  # new values, same addresses
    graph.replay()
    torch.cuda.synchronize()
    assert (y.float() - reference(x, 32, weight, bias, 1e-5, True)).abs().max().item() < 1.5e-2


def test_installed_unet_computes_what_diffusers_blocks_compute():
    """On the CPU `group_norm` is PyTorch's, so any difference would be the rewired blocks' own."""
    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        report = norms.install_fused_norms(unet)
        got = unet(sample, 500, context).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    count = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    assert report.fused_with_silu + report.plain == count and not report.left
    assert report.fused_with_silu > report.plain > 0
    assert "GroupNorms use the sdrun kernel" in report.summary()
    keys = set(unet.state_dict())
    assert keys == set(tiny_unet().state_dict())  # the same parameters under the same names: LoRA and fp8 still apply


def test_installed_vae_computes_what_diffusers_blocks_compute():
    from sdrun import models

    vae = models.build_tiny().vae.eval()
    latents = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(2))
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.decode(latents).sample, vae.encode(pixels).latent_dist.parameters
        report = norms.install_fused_norms(vae, "VAE")
        got = vae.decode(latents).sample, vae.encode(pixels).latent_dist.parameters
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    count = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
    assert report.fused_with_silu + report.plain == count and not report.left
    assert report.plain == sum(type(m).__name__ == "Attention" for m in vae.modules())  # their input norms
    assert report.summary().startswith(f"{count} VAE GroupNorms use the sdrun kernel")


def test_under_a_torch_function_mode_the_norms_leave_the_kernel_to_the_mode(monkeypatch):
    """The tiled decode's shared statistics intercept `F.group_norm` through a TorchFunctionMode: with the kernel
    standing in as if it took every input, a tiled decode still never calls it, and equals the tiled decode of the
    VAE as diffusers built it (within float32 rounding); outside the mode the kernel is called."""
    from sdrun import models
    from sdrun.render import shared_norm_tiles

    vae = models.build_tiny().vae.eval()
    latents = torch.randn(1, vae.config.latent_channels, 24, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = shared_norm_tiles.decode(vae, latents, 32, 8)
    norms.install_fused_norms(vae, "VAE")
    kernel_calls = []

    class StandIn:
        def group_norm(self, x, groups, weight, bias, eps, silu, add):
            kernel_calls.append(x.shape)
            return norms.F.silu(norms.F.group_norm(x, groups, weight, bias, eps)) if silu else \
                norms.F.group_norm(x, groups, weight, bias, eps)

    monkeypatch.setattr(norms, "kernel_takes", lambda x: True)
    monkeypatch.setattr(norms._ext, "get", lambda device=None: StandIn())
    with torch.no_grad():
        tiled = shared_norm_tiles.decode(vae, latents, 32, 8)
        assert not kernel_calls
        vae.decode(latents)
    torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=2e-5)
    assert len(kernel_calls) == sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_vae_on_the_kernel_matches_pytorch_and_leaves_tiled_statistics_alone(channels_last):
    from sdrun import models
    from sdrun.render import shared_norm_tiles

    ops.load()
    vae = models.build_tiny().vae.eval().to("cuda", torch.float16)
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    latents = torch.randn(1, vae.config.latent_channels, 48, 64, generator=torch.Generator().manual_seed(4))
    latents = latents.to("cuda", torch.float16)
    with torch.no_grad():
        exact = models.build_tiny().vae.eval().to("cuda").decode(latents.float()).sample
        pytorch = vae.decode(latents).sample.float()
        tiled = shared_norm_tiles.decode(vae, latents, 64, 16).float()
        norms.install_fused_norms(vae, "VAE")
        kernel = vae.decode(latents).sample.float()
        tiled_after = shared_norm_tiles.decode(vae, latents, 64, 16).float()
    assert (kernel - exact).abs().max() <= 2 * (pytorch - exact).abs().max() + 5e-3
    assert not torch.equal(kernel, pytorch)  # the kernel did run (it rounds once where PyTorch rounds twice)
    # under the tiles' TorchFunctionMode the norms were PyTorch's: the same decode but for the biases' order of sums
    assert (tiled_after - tiled).abs().max() <= (pytorch - exact).abs().max() + 1e-3


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_on_the_kernel_matches_pytorch(channels_last):
    ops.load()
    unet = tiny_unet("cuda", torch.float16)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    sample, context = tiny_unet_inputs(unet, "cuda", torch.float16)
    with torch.no_grad():
        pytorch = unet(sample, 500, context).sample.float()
        norms.install_fused_norms(unet)
        kernel = unet(sample, 500, context).sample.float()
    reference_unet = tiny_unet("cuda", torch.float32)
    with torch.no_grad():
        exact = reference_unet(sample.float(), 500, context.float()).sample
    # the kernel's error against float32 is of the size of PyTorch's own fp16 GroupNorm's: rounding, no wrong value
    print("max error against float32: kernel", (kernel - exact).abs().max().item(), "PyTorch",
          (pytorch - exact).abs().max().item())
    assert (kernel - exact).abs().max() <= 2 * (pytorch - exact).abs().max() + 5e-3
