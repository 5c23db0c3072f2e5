"""sdrun's fp8 widening kernel (csrc/fp8_widen.cu) against the float32 reference: every e4m3 value is exact in
float16 and bfloat16, so the kernel's output must equal `weight.float().to(dtype)` bit for bit, on fresh random
weights of SD layer shapes, every one of the 256 bit patterns, odd sizes (the one-value-a-thread tail), views that
are not 16-byte aligned, and channels-last layouts. On the CPU, widen_fp8 is torch's cast and the fp8 hook's
default. GPU tests are marked `cuda`."""

import pytest
import torch

import sdrun.ops as ops
from sdrun.fp8_storage import storage_dtype

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def fp8_weights(*shape, device="cuda", seed=0) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    return (torch.randn(*shape, device=device, generator=generator) * 0.2).to(FP8)


def assert_exact(widened: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> None:
    reference = weight.float().to(dtype)
    assert widened.dtype == dtype and widened.shape == weight.shape and widened.stride() == weight.stride()
    nan = torch.isnan(reference)  # e4m3fn's two NaN patterns: NaN stays NaN (its payload is the converter's)
    assert torch.equal(torch.isnan(widened), nan)
    assert torch.equal(widened[~nan].view(torch.int16), reference[~nan].view(torch.int16))  # -0.0 too


def test_on_the_cpu_widen_is_torch_cast():
    weight = fp8_weights(64, 33, device="cpu")
    assert_exact(ops.widen_fp8(weight, torch.float16), weight, torch.float16)
    assert storage_dtype() == FP8


def test_is_dense_is_what_empty_like_keeps():
    """ops.is_dense decides which weights go to the kernel. The reference: torch's empty_like keeps the strides of
    a non-overlapping dense tensor, and of no other (its result is always dense)."""
    base = torch.randn(6, 4, 3, 5)
    views = [base, base.transpose(0, 2), base.to(memory_format=torch.channels_last), base[:, :2], base[::2],
             base[:1], base[..., 1:], base.expand(2, 6, 4, 3, 5)[0], torch.randn(1, 5).expand(3, 5), base[0, 0, 0, :1],
             torch.randn(7)[1:], torch.randn(0, 3)]
    for view in views:
        assert ops.is_dense(view) == (torch.empty_like(view).stride() == view.stride()), (view.shape, view.stride())
    assert ops.is_dense(base.transpose(1, 3)) and not ops.is_dense(base[:, ::2])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(320, 320, 3, 3), (1280, 5120), (640, 2560), (4, 320, 3, 3), (77,), (3, 5, 7),
                                   (1,), (17, 16)])
def test_kernel_equals_the_float32_reference(dtype, shape):
    ops.load()
    weight = fp8_weights(*shape, seed=sum(shape))
    assert_exact(ops.widen_fp8(weight, dtype), weight, dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_bit_pattern(dtype):
    ops.load()
    weight = torch.arange(256, dtype=torch.uint8, device="cuda").repeat(5).view(FP8)  # 1280 values: vector path
    assert_exact(ops.widen_fp8(weight, dtype), weight, dtype)


@cuda
@pytest.mark.cuda
def test_unaligned_views_and_channels_last():
    ops.load()
    flat = fp8_weights(4099)
    for offset in (1, 3, 8, 16):
        view = flat[offset:offset + 4000]
        assert_exact(ops.widen_fp8(view, torch.float16), view, torch.float16)
    conv = fp8_weights(64, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    assert_exact(ops.widen_fp8(conv, torch.float16), conv, torch.float16)


@cuda
@pytest.mark.cuda
def test_bad_inputs_are_refused_by_the_binding():
    ops.load()
    from sdrun.ops import _ext

    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        _ext.get().widen_fp8(torch.ones(8, device="cuda", dtype=torch.float16), torch.float16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        _ext.get().widen_fp8(fp8_weights(8), torch.float32)
    with pytest.raises(RuntimeError, match="dense"):
        _ext.get().widen_fp8(fp8_weights(8, 8)[:, ::2], torch.float16)
    # a strided view that is not dense falls back to torch's cast in widen_fp8
    view = fp8_weights(8, 8)[:, ::2]
    assert torch.equal(ops.widen_fp8(view, torch.float16), view.float().half())


def test_the_run_time_check_refuses_a_widening_that_differs_from_torch():
    """fp8_storage checks the kernel once a run against torch's cast; a wrong one is not used."""
    from sdrun.fp8_storage import _widens_like_torch

    cpu = torch.device("cpu")
    assert _widens_like_torch(lambda weight, dtype: weight.to(dtype), cpu)
    assert not _widens_like_torch(lambda weight, dtype: weight.to(dtype) * 1.001, cpu)
    assert not _widens_like_torch(lambda weight, dtype: weight.to(dtype).nan_to_num(), cpu)
