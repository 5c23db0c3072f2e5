"""sdrun's GEGLU kernel (csrc/geglu.cu) against a float64 reference, and its place in the UNet.

GPU (marked `cuda`): fresh random inputs at the feed-forward shapes of SD 1.x and SDXL and odd ones, every dtype, the
binding's refusals, CUDA graph capture, and the tiny UNet with the kernel against float32. CPU: the UNet with
`install_fused_geglu` computes exactly what diffusers' own GEGLU computes (there `geglu` is PyTorch's).
"""

import pytest
import torch
import torch.nn.functional as F

import sdrun.ops as ops
from sd_layout import tiny_unet, tiny_unet_inputs, unet_against_float32
from sdrun.ops import feed_forward

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(projected):
    hidden, gate = projected.double().chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).float()


TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6}  # relative: one rounding of the output


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4096, 2560), (2, 1024, 5120), (2, 64, 10240), (32, 256, 2560), (3, 7, 32),
                                   (5, 16), (1, 1, 48)])
def test_kernel_matches_the_float64_reference(dtype, shape):
    ops.load()
    generator = torch.Generator("cuda").manual_seed(sum(shape))
    projected = (torch.randn(*shape, device="cuda", generator=generator) * 3).to(dtype)
    assert feed_forward.kernel_takes(projected)
    y = feed_forward.geglu(projected)
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2) and y.is_contiguous()
    expected = reference(projected)
    error = ((y.float() - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    assert error <= TOLERANCE[dtype], error
    # PyTorch's own two operations, for scale: the kernel rounds once, they round twice
    hidden, gate = projected.chunk(2, dim=-1)
    pytorch_error = ((hidden * F.gelu(gate)).float() - expected).abs().max().item()
    assert (y.float() - expected).abs().max().item() <= pytorch_error + 1e-6


@cuda
@pytest.mark.cuda
def test_binding_refuses_what_it_cannot_read():
    ops.load()
    op = ops._ext.get().geglu
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.t())
    with pytest.raises(RuntimeError, match="twice a multiple of 8"):
        op(x[:, :40].contiguous())
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        op(x.to(torch.float64))
    with pytest.raises(RuntimeError):
        op(x.cpu())
    assert not feed_forward.kernel_takes(x.t()) and not feed_forward.kernel_takes(x[:, :40].contiguous())
    # what the kernel refuses, geglu computes with PyTorch
    strided = torch.randn(64, 4, device="cuda", dtype=torch.float16).t()
    hidden, gate = strided.chunk(2, dim=-1)
    assert torch.equal(feed_forward.geglu(strided), hidden * F.gelu(gate))


@cuda
@pytest.mark.cuda
def test_kernel_runs_inside_a_cuda_graph():
    ops.load()
    x = torch.randn(2, 4096, 2560, device="cuda", dtype=torch.float16)
    feed_forward.geglu(x)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = feed_forward.geglu(x)
    x.copy_(torch.randn_like(x) * 2)  # new values, same address
    graph.replay()
    torch.cuda.synchronize()
    expected = reference(x)
    assert ((y.float() - expected).abs() / expected.abs().clamp(min=1.0)).max().item() <= TOLERANCE[torch.float16]


def test_installed_unet_computes_what_diffusers_geglu_computes():
    """On the CPU `geglu` is PyTorch's, so any difference would be the rewired forward's own."""
    from diffusers.models.activations import GEGLU

    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        changed = feed_forward.install_fused_geglu(unet)
        got = unet(sample, 500, context).sample
    assert changed == sum(isinstance(m, GEGLU) for m in unet.modules()) > 0
    assert torch.equal(got, expected)
    assert set(unet.state_dict()) == set(tiny_unet().state_dict())  # the same parameters under the same names


@cuda
@pytest.mark.cuda
def test_unet_on_the_kernel_matches_float32():
    ops.load()
    kernel, pytorch, exact = unet_against_float32(feed_forward.install_fused_geglu)
    assert not torch.equal(kernel, pytorch)  # the kernel ran (it rounds once where PyTorch rounds twice)
    assert (kernel - exact).abs().max() <= 2 * (pytorch - exact).abs().max() + 5e-3
