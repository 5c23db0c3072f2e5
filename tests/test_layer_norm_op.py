"""sdrun's LayerNorm (+ residual addition) kernel (csrc/layer_norm.cu) against a float64 reference, and its place in
the UNet's transformer blocks.

GPU (marked `cuda`): fresh random inputs with a mean far from zero, SD's row widths and odd ones, every dtype, with
and without a residual and affine parameters; the sum it writes is PyTorch's addition exactly; the binding's
refusals; the UNet with the fused blocks against float32, no further from it than PyTorch's own.
CPU: the fused blocks compute exactly what diffusers' own compute (there the norms and additions are PyTorch's),
and step aside for what they do not cover.
"""

import pytest
import torch
import torch.nn.functional as F

import sdrun.ops as ops
from sd_layout import tiny_unet, tiny_unet_inputs, unet_against_float32
from sdrun.ops import layer_norms

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 2e-5}  # a few units of the last place


def norm_of(width, dtype, affine, seed):
    norm = torch.nn.LayerNorm(width, elementwise_affine=affine, device="cuda", dtype=dtype)
    if affine:
        generator = torch.Generator("cuda").manual_seed(seed)
        norm.weight.data = (torch.randn(width, device="cuda", generator=generator) + 1).to(dtype)
        norm.bias.data = torch.randn(width, device="cuda", generator=generator).to(dtype)
    return norm


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (1, 9, 2048), (3, 7, 40),
                                   (5, 8)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_kernel_matches_the_float64_reference(dtype, shape, with_residual, affine):
    ops.load()
    generator = torch.Generator("cuda").manual_seed(sum(shape))
    x = (torch.randn(*shape, device="cuda", generator=generator) * 2 + 3).to(dtype)  # mean 3: no trivial cancel
    residual = (torch.randn(*shape, device="cuda", generator=generator) * 3 - 1).to(dtype) if with_residual else None
    norm = norm_of(shape[-1], dtype, affine, seed=len(shape))
    assert layer_norms.kernel_takes(x, norm, residual)
    if with_residual:
        total, y = layer_norms.add_layer_norm(x, residual, norm)
        assert torch.equal(total, x + residual)  # rounded as PyTorch rounds the addition
    else:
        total, y = x, layer_norms.layer_norm(x, norm)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    weight, bias = (None, None) if not affine else (norm.weight.double(), norm.bias.double())
    expected = F.layer_norm(total.double(), (shape[-1],), weight, bias, norm.eps)
    error = (y.double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item() / 4), error


@cuda
@pytest.mark.cuda
def test_binding_refuses_what_it_cannot_read():
    ops.load()
    kernel = ops._ext.get().layer_norm
    x = torch.randn(4, 320, device="cuda", dtype=torch.float16)
    weight = torch.ones(320, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernel(torch.randn(4, 36, device="cuda", dtype=torch.float16), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.randn(320, 4, device="cuda", dtype=torch.float16).t(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x's dtype"):
        kernel(x, weight.float(), None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        kernel(x, weight, None, 1e-5, x[:2])
    with pytest.raises(RuntimeError, match="eps"):
        kernel(x, weight, None, 0.0)
    norm = torch.nn.LayerNorm(320, device="cuda", dtype=torch.float16)
    strided = torch.randn(4, 640, device="cuda", dtype=torch.float16)[:, ::2]
    assert not layer_norms.kernel_takes(strided, norm)  # the wrappers give it to PyTorch
    torch.testing.assert_close(layer_norms.layer_norm(strided, norm), norm(strided))


@cuda
@pytest.mark.cuda
def test_unet_with_fused_blocks_is_as_close_to_float32_as_pytorchs(monkeypatch):
    """The kernel's statistics are float32 and its output rounded once, as PyTorch's: on the H100 the tiny UNet's
    output came out bit-identical to PyTorch's, so the kernel's calls are counted rather than inferred from a
    difference."""
    ops.load()
    taken = []
    kernel_takes = layer_norms.kernel_takes
    monkeypatch.setattr(layer_norms, "kernel_takes", lambda *args: taken.append(kernel_takes(*args)) or taken[-1])

    def change(unet):
        assert layer_norms.install_fused_layer_norms(unet) > 0

    fused, pytorch, exact = unet_against_float32(change)
    print("max error against float32: fused", (fused - exact).abs().max().item(), "PyTorch",
          (pytorch - exact).abs().max().item())
    assert taken and all(taken)  # every norm of the fused blocks ran on the kernel
    assert (fused - exact).abs().max() <= 2 * (pytorch - exact).abs().max() + 5e-3


def test_fused_blocks_compute_what_diffusers_blocks_compute():
    """On the CPU the norms and additions are PyTorch's: any difference would be the rewired forward's own."""
    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        assert layer_norms.install_fused_layer_norms(unet) == len(blocks) > 0
        got = unet(sample, 500, context).sample
        blocks[0].set_chunk_feed_forward(2, 1)  # chunked feed-forward: diffusers' own forward, the same result
        chunked = unet(sample, 500, context).sample
    assert torch.equal(got, expected)
    torch.testing.assert_close(chunked, expected)
    assert all("forward" in vars(block) for block in blocks)
