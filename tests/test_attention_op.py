"""sdrun's attention kernel against an fp32 reference (flash-attention's error bound: at most twice PyTorch's own
same-precision error). GPU tests are marked `cuda` and skip without CUDA; the CPU tests check what must hold
everywhere (imports never raise, reasons are sentences, the fake implementation's shapes)."""

import math

import pytest
import torch

import sdrun.ops as ops
from sdrun.ops import _ext
from sdrun.ops.reference import reference_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
sm80 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                          reason="bfloat16 needs sm80+")
DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=sm80)]
# Variant 9 forces the portable mma.sync path where the default is another one (sm_90: the wgmma kernel), and 10
# the wgmma kernel with every tile split along the keys (the default splits only a last wave's tiles), so a Hopper
# GPU checks all three; elsewhere they run the same code.
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="variants 9 and 10 differ from the default only on compute capability 9.0")
PATHS = [pytest.param(0, id="default"), pytest.param(9, id="portable", marks=hopper),
         pytest.param(10, id="split", marks=hopper)]
HEAD_DIMS = [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 144, 160, 192, 200, 224, 256]
SEQLENS = [(1, 1), (1, 77), (77, 77), (97, 77), (97, 150), (113, 203), (256, 256), (1025, 77), (1025, 1025),
           (4096, 77), (4097, 4097)]


# ---------------------------------------------------------------------- CPU (any machine)
def test_import_never_raises():
    import importlib

    importlib.reload(ops)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only machines")
def test_unavailable_reasons_on_cpu_mention_cuda():
    reasons = ops.unavailable_reasons()
    assert reasons and "CUDA" in reasons[0] and reasons[0].endswith(".")
    from sdrun.errors import KernelUnavailable

    with pytest.raises(KernelUnavailable, match="CUDA"):
        ops.load()


def test_fake_impl_shapes_on_meta():
    q = torch.empty(2, 4096, 8, 40, device="meta", dtype=torch.float16).transpose(1, 2).transpose(1, 2)
    k = torch.empty(2, 77, 8, 40, device="meta", dtype=torch.float16)
    out = torch.ops.sdrun.mem_eff_attn(q, k, k, 0.125)
    assert out.shape == (2, 4096, 8, 40) and out.dtype == torch.float16 and out.is_contiguous()


def test_supports_reasons():
    dev = torch.device("cuda")
    assert ops.supports(512, torch.float16, dev) == "head_dim 512 > 256"
    assert "multiple of 8" in ops.supports(42, torch.float16, dev)
    assert "float32" in ops.supports(64, torch.float32, dev)
    assert "not a CUDA device" in ops.supports(64, torch.float16, torch.device("cpu"))


def test_reference_matches_sdpa_on_cpu():
    q, k, v = (torch.randn(1, n, 2, 16) for n in (5, 7, 7))
    ref = reference_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- GPU
def rand(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def run_poisoned(q, k, v, scale=None, variant=0):
    """Calls the binding with a NaN-filled output buffer, so an element the kernel does not write shows up."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.full(q.shape, float("nan"), device=q.device, dtype=q.dtype)
    _ext.get().fwd_out(q, k, v, scale, out, variant)
    return out


def check(q, k, v, scale=None, variant=0):
    out = run_poisoned(q, k, v, scale, variant)
    ref = reference_attention(q, k, v, scale)
    pt = reference_attention(q, k, v, scale, upcast=False, reorder_ops=True)
    err, err_pt = (out - ref).abs().max().item(), (pt - ref).abs().max().item()
    print(f"max err {err:.3e} (pytorch {err_pt:.3e}), mean {(out - ref).abs().mean().item():.3e}")
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    assert err <= 2 * err_pt + 1e-5


@pytest.fixture(scope="module")
def kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ops.load()
    return _ext.get()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("nq,nk", SEQLENS)
@pytest.mark.parametrize("variant", PATHS)
def test_matches_reference(kernel, nq, nk, d, dtype, variant):
    torch.manual_seed(nq * 1000 + nk + d)
    check(rand(2, nq, 3, d, dtype=dtype), rand(2, nk, 3, d, dtype=dtype), rand(2, nk, 3, d, dtype=dtype),
          variant=variant)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,n,nk,d", [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80),
                                        (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160), (2, 8, 256, 77, 160),
                                        (2, 5, 4096, 4096, 64), (2, 10, 1024, 77, 64), (1, 2, 16384, 16384, 40),
                                        (2, 8, 8192, 8192, 40),  # LongShape on the portable path
                                        (2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64)])  # SDXL at 1024x1024
@pytest.mark.parametrize("variant", PATHS)
def test_sd_shapes(kernel, b, h, n, nk, d, dtype, variant):
    torch.manual_seed(n + nk + d)
    check(rand(b, n, h, d, dtype=dtype), rand(b, nk, h, d, dtype=dtype), rand(b, nk, h, d, dtype=dtype),
          variant=variant)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [40, 64, 80, 160])
@pytest.mark.parametrize("variant", PATHS)
def test_strided_inputs(kernel, d, dtype, variant):
    """q, k, v sliced from a packed (B, N, 3, H, D) projection and a (B, H, N, D) transposed tensor."""
    torch.manual_seed(d)
    qkv = rand(2, 1025, 3, 4, d, dtype=dtype)
    q, k, v = qkv.unbind(2)
    check(q, k, v, variant=variant)
    kt = rand(2, 4, 97, d, dtype=dtype).transpose(1, 2)  # (B, N, H, D) view of (B, H, N, D)
    vt = rand(2, 4, 97, d + 8, dtype=dtype)[..., :d].transpose(1, 2)
    check(q, kt, vt, variant=variant)
    ke = rand(2, 150, 1, d, dtype=dtype).expand(2, 150, 4, d)  # one key head for all four: head stride 0
    check(q, ke, ke, variant=variant)
    out = ops.memory_efficient_attention(q, kt, vt)  # the public path too
    torch.testing.assert_close(out, run_poisoned(q, kt, vt), atol=0, rtol=0)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_scale_and_large_values(kernel, dtype):
    torch.manual_seed(1)
    q, k, v = (rand(2, 333, 4, 64, dtype=dtype) * 4 for _ in range(3))
    check(q, k, v, scale=0.3)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("d", [40, 64, 80, 256])
@pytest.mark.parametrize("variant", PATHS)
def test_deterministic(kernel, d, variant):
    torch.manual_seed(d)
    q, k, v = (rand(2, 2049, 8, d, dtype=torch.float16) for _ in range(3))
    a, b = run_poisoned(q, k, v, variant=variant), run_poisoned(q, k, v, variant=variant)
    assert torch.equal(a, b)


ERROR_CASES = {
    "head_dim must be a multiple of 8": "q = k = v = r(1, 8, 2, 42)",
    "same dtype": "q = v = r(1, 8, 2, 40); k = q.float()",
    "k must have shape": "q = v = r(1, 8, 2, 40); k = r(1, 8, 3, 40)",
    "must be a CUDA tensor": "q = r(1, 8, 2, 40); k = v = q.cpu()",
}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("message", list(ERROR_CASES))
def test_input_checks_have_named_messages(kernel, message):
    """Run in a child process, so that a crash on the error path fails this test instead of ending the session."""
    import os
    import subprocess
    import sys

    code = ("import torch, sdrun.ops as o\nr = lambda *s: torch.randn(*s, device='cuda', dtype=torch.float16)\n"
            f"{ERROR_CASES[message]}\ntry:\n    o.memory_efficient_attention(q, k, v)\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RAISED" in res.stdout and message in res.stdout, res.stdout[-2000:]


@pytest.mark.cuda
@cuda
def test_torch_compile_fullgraph(kernel):
    torch.manual_seed(0)
    q, k, v = (rand(2, 256, 8, 40, dtype=torch.float16) for _ in range(3))

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return ops.memory_efficient_attention(q * 1.0, k, v) + 1

    torch.testing.assert_close(f(q, k, v), ops.memory_efficient_attention(q, k, v) + 1)


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_and_replay(kernel):
    torch.manual_seed(0)
    q, k, v = (rand(2, 1024, 8, 80, dtype=torch.float16) for _ in range(3))
    ops.memory_efficient_attention(q, k, v)  # warm-up outside the graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.memory_efficient_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.memory_efficient_attention(q, k, v)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ops.memory_efficient_attention(q, k, v), atol=0, rtol=0)


# ---------------------------------------------------------------------- in a diffusers pipeline
def _tiny_models(vae_width):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, vae_width), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    return unet, vae


class _Pipe:
    def __init__(self, **components):
        self.components = components


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_processor_matches_sdpa_on_tiny_unet_and_vae(kernel, dtype):
    pytest.importorskip("diffusers")
    from sdrun.ops.processor import install

    unet, vae = _tiny_models(512)
    unet, vae = unet.to("cuda", dtype), vae.to("cuda", dtype)
    gen = torch.Generator("cuda").manual_seed(0)
    lat = torch.randn(2, 4, 32, 32, device="cuda", dtype=dtype, generator=gen)
    text = torch.randn(2, 77, 32, device="cuda", dtype=dtype, generator=gen)
    with torch.no_grad():
        ref_noise = unet(lat, 10, encoder_hidden_states=text).sample
        ref_img = vae.decode(lat).sample
        report = install(_Pipe(unet=unet, vae=vae, scheduler=None))
        noise = unet(lat, 10, encoder_hidden_states=text).sample
        img = vae.decode(lat).sample
    print(report.summary())
    from diffusers.models.attention_processor import Attention

    assert report.kernel_modules == sum(isinstance(m, Attention) for m in unet.modules())  # every UNet module
    assert {n for n, _ in report.left_on_sdpa} == {"vae.encoder.mid_block.attentions.0", "vae.decoder.mid_block.attentions.0"}
    assert "head_dim 512 > 256" in report.summary() and "stay on PyTorch SDPA" in report.summary()
    assert type(vae.decoder.mid_block.attentions[0].processor).__name__ == "AttnProcessor2_0"
    cos = torch.nn.functional.cosine_similarity(noise.flatten().float(), ref_noise.flatten().float(), dim=0)
    assert cos > 0.9999, cos
    torch.testing.assert_close(noise.float(), ref_noise.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(img, ref_img, atol=0, rtol=0)  # the VAE stayed on SDPA
