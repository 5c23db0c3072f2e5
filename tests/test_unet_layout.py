"""--channels-last's transformer output step (backends/channels_last.py) computes what diffusers' own does, in NHWC,
for both kinds of transformer projection (SD 1.x's 1x1 convolutions, SD 2.x's and SDXL's linear layers)."""

import pytest
import torch

from sd_layout import tiny_unet, tiny_unet_inputs
from sdrun.backends.channels_last import install_transformer_outputs


@pytest.mark.parametrize("linear_projection", [False, True])
def test_nhwc_transformer_output_matches_diffusers(linear_projection, monkeypatch):
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    own_steps = []  # calls of diffusers' own output step (with its copy to NCHW)
    own = Transformer2DModel._get_output_for_continuous_inputs
    monkeypatch.setattr(Transformer2DModel, "_get_output_for_continuous_inputs",
                        lambda self, *args, **kwargs: own_steps.append(1) or own(self, *args, **kwargs))

    unet = tiny_unet()
    if linear_projection:
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config({**unet.config, "use_linear_projection": True}).eval()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        changed = install_transformer_outputs(unet)
        calls_before = len(own_steps)
        nchw = unet(sample, 500, context).sample  # an NCHW residual takes diffusers' own step
        assert len(own_steps) - calls_before == changed
        unet.to(memory_format=torch.channels_last)
        calls_before = len(own_steps)
        got = unet(sample.to(memory_format=torch.channels_last), 500, context).sample
        assert len(own_steps) == calls_before  # NHWC: none of them
    assert changed == sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules()) > 0
    assert torch.equal(nchw, expected)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
