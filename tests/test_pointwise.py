"""Convolution biases added in passes made anyway (ops/pointwise.py, ops/norms.py's ResNet forward): 1x1
convolutions as GEMMs on the NHWC view with the bias in the epilogue, conv1's bias added by the GroupNorm after it,
conv2's by the shortcut; each stepping aside where something wraps the convolution.

CPU: the GEMM equals the convolution; the rewired UNet and VAE equal diffusers' within float32 rounding (the biases
are summed in another order); the GEMM and the moved biases are really used; LoRA layers, hooks and replaced
forwards keep the convolution whole. GPU (marked `cuda`): the channels-last UNet with every rewiring (and the
kernel's attention, projections packed as --xformers packs them) against float32, no further from it than
PyTorch's own fp16 UNet.
"""

import pytest
import torch
import torch.nn.functional as F

from sd_layout import tiny_unet, tiny_unet_inputs, unet_against_float32
from sdrun.backends.channels_last import install_transformer_outputs
from sdrun.ops import norms, pointwise, processor

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rewired(unet):
    """What --channels-last and --xformers do to the UNet's blocks (the kernels aside)."""
    unet.to(memory_format=torch.channels_last)
    install_transformer_outputs(unet)
    changed = pointwise.install_pointwise_convs(unet)
    norms.install_fused_norms(unet)
    return changed


def spy_linear(monkeypatch):
    """Records, for each GEMM run on a convolution's weight (a view of its 4-D tensor), whether it added a bias."""
    calls = []
    linear = F.linear

    def spy(x, weight, bias=None):
        if weight._base is not None and weight._base.dim() == 4:
            calls.append(bias is not None)
        return linear(x, weight, bias)

    monkeypatch.setattr(pointwise.F, "linear", spy)
    return calls


def spy_convolutions(monkeypatch):
    """Records, for each 3x3 (or NCHW) convolution run, whether it ran without its bias."""
    without_bias = []
    convolution = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward",
                        lambda self, x, weight, bias: without_bias.append(bias is None and self.bias is not None)
                        or convolution(self, x, weight, bias))
    return without_bias


@pytest.mark.parametrize("bias", [True, False])
def test_a_pointwise_conv_is_the_convolution_in_either_layout(bias, monkeypatch):
    conv = torch.nn.Conv2d(48, 40, 1, bias=bias)
    gemm = pointwise.PointwiseConv(conv)
    assert gemm.weight is conv.weight and gemm.bias is conv.bias
    x = torch.randn(2, 48, 6, 10, generator=torch.Generator().manual_seed(1)) * 3 + 1
    calls = spy_linear(monkeypatch)
    with torch.no_grad():
        nhwc = gemm(x.to(memory_format=torch.channels_last))
        assert calls == [bias]  # one GEMM, the bias in it
        nchw = gemm(x)
        assert len(calls) == 1  # NCHW: cuDNN's (here PyTorch's) convolution
        expected = conv(x)
    assert nhwc.shape == expected.shape and nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(nchw, expected)


def test_only_plain_unwrapped_1x1_convolutions_are_replaced():
    model = torch.nn.ModuleDict({"pointwise": torch.nn.Conv2d(8, 8, 1), "square": torch.nn.Conv2d(8, 8, 3),
                                 "strided": torch.nn.Conv2d(8, 8, 1, stride=2), "hooked": torch.nn.Conv2d(8, 8, 1)})
    model["hooked"].register_forward_hook(lambda *args: None)
    keys = set(model.state_dict())
    assert pointwise.install_pointwise_convs(model) == 1
    assert type(model["pointwise"]) is pointwise.PointwiseConv
    assert [type(model[name]) for name in ("square", "strided", "hooked")] == [torch.nn.Conv2d] * 3
    assert set(model.state_dict()) == keys  # LoRA and fp8 find the same names


def test_a_wrapped_convolution_is_not_bare():
    from diffusers.hooks import HookRegistry, ModelHook
    from peft import LoraConfig, inject_adapter_in_model

    from sdrun.render.forwards import forward_replaced

    assert pointwise.runs_bare(torch.nn.Conv2d(4, 4, 3))
    assert pointwise.runs_bare(pointwise.PointwiseConv(torch.nn.Conv2d(4, 4, 1)))
    pre_hooked, hooked, registry = (torch.nn.Conv2d(4, 4, 3) for _ in range(3))
    pre_hooked.register_forward_pre_hook(lambda *args: None)
    hooked.register_forward_hook(lambda *args: None)
    HookRegistry.check_if_exists_or_initialize(registry).register_hook(ModelHook(), "test")  # offload, fp8 storage
    assert not any(map(pointwise.runs_bare, (pre_hooked, hooked, registry)))
    banded = torch.nn.Conv2d(4, 4, 3)
    with forward_replaced(banded, banded.forward):
        assert not pointwise.runs_bare(banded)
    assert pointwise.runs_bare(banded)
    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(4, 4, 3))
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv"]), model)
    assert not pointwise.runs_bare(model.conv)


def test_rewired_unet_computes_what_diffusers_computes_and_moves_the_biases(monkeypatch):
    """On the CPU the norms are PyTorch's: a difference would be the rewiring's own, beyond the order of sums."""
    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        changed = rewired(unet)
        calls, without_bias = spy_linear(monkeypatch), spy_convolutions(monkeypatch)
        got = unet(sample.to(memory_format=torch.channels_last), 500, context).sample
    shortcuts = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D" and m.conv_shortcut is not None]
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    assert changed == len(shortcuts) + 2 * transformers > 0
    assert len(calls) == changed and all(calls)  # every 1x1 convolution ran as a GEMM with its bias
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert sum(without_bias) == resnets + len(shortcuts)  # each conv1, and conv2 where a shortcut adds its bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_rewired_vae_computes_what_diffusers_computes(monkeypatch):
    from sdrun import models

    vae = models.build_tiny().vae.eval()
    latents = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vae.decode(latents).sample
        vae.to(memory_format=torch.channels_last)
        assert pointwise.install_pointwise_convs(vae) > 0
        norms.install_fused_norms(vae, "VAE")
        without_bias = spy_convolutions(monkeypatch)
        got = vae.decode(latents.to(memory_format=torch.channels_last)).sample
    resnets = [m for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert sum(without_bias) == len(resnets) + sum(m.conv_shortcut is not None for m in resnets) > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_lora_wrapped_convolutions_run_whole():
    """PEFT's LoRA layers wrap conv1, conv2, a shortcut and a transformer's projections: the rewired blocks call
    them whole (the LoRA's product included) and compute what the unrewired UNet with the same LoRA computes."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, target_modules=["conv1", "conv2", "conv_shortcut", "proj_in"], init_lora_weights=False)
    torch.manual_seed(5)
    plain = inject_adapter_in_model(config, tiny_unet())
    torch.manual_seed(5)
    rewired_unet = inject_adapter_in_model(config, tiny_unet())
    sample, context = tiny_unet_inputs(plain, "cpu", torch.float32)
    with torch.no_grad():
        without_lora = tiny_unet()(sample, 500, context).sample
        expected = plain(sample, 500, context).sample
        rewired(rewired_unet)
        got = rewired_unet(sample.to(memory_format=torch.channels_last), 500, context).sample
    assert (expected - without_lora).abs().max() > 1e-3  # the LoRA changes the output: its product ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


@cuda
@pytest.mark.cuda
def test_rewired_fp16_unet_is_as_close_to_float32_as_pytorchs():
    import sdrun.ops as ops

    ops.load()

    def change(unet):
        rewired(unet)
        processor.install(unet)
        assert processor.pack_projections(unet) > 0  # q, k, v by one GEMM too, as --xformers runs them,
        assert norms.pack_time_projections(unet) > 0  # and the time projections

    got, pytorch, exact = unet_against_float32(change, channels_last=True)
    print("max error against float32: rewired", (got - exact).abs().max().item(), "PyTorch",
          (pytorch - exact).abs().max().item())
    assert (got - exact).abs().max() <= 2 * (pytorch - exact).abs().max() + 5e-3
