"""--channels-last: store the UNet and VAE convolution weights in NHWC order, which cuDNN's fast kernels prefer.

A transformer block of the UNet (diffusers' Transformer2DModel) hands its output back with
`.permute(0, 3, 1, 2).contiguous()`: a copy to NCHW, which the next convolution (NHWC weights) copies back to NHWC,
both through PyTorch's strided copy kernel. In NHWC the permuted view already is the layout the convolution and the
residual addition want, so `apply` gives each transformer an output step without that copy. Measured on an H100
(bench/unet_profile.py, SD 1.5, `--xformers`, one run): a forward of 32 windows of 512x512 85.9 -> 80.7 ms, one at
512x512 batch 2 8.54 -> 8.13 ms.

The 1x1 convolutions of the UNet and the VAE (a transformer's projections in and out, a ResNet block's shortcut)
then run as GEMMs on the NHWC view, their bias in cuBLAS's epilogue instead of a pass of its own (ops/pointwise.py).
"""

import types

from sdrun.backends.base import Backend


def transformer_output_in_place(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """Transformer2DModel._get_output_for_continuous_inputs (diffusers 0.42) without the copy to NCHW when the
    residual is NHWC: the same values, in the residual's layout."""
    import torch

    if not residual.is_contiguous(memory_format=torch.channels_last) or residual.is_contiguous():
        return type(self)._get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width,
                                                            inner_dim)
    if not self.use_linear_projection:
        hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
    else:
        hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def install_transformer_outputs(unet) -> int:
    """Give every Transformer2DModel of `unet` the copy-free output step; returns how many it changed."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    changed = 0
    for module in unet.modules():
        if type(module) is Transformer2DModel and module.is_input_continuous:
            module._get_output_for_continuous_inputs = types.MethodType(transformer_output_in_place, module)
            changed += 1
    return changed


def apply(pipe, _device):
    import torch

    from sdrun.ops.pointwise import install_pointwise_convs

    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    install_transformer_outputs(pipe.unet)
    for model in (pipe.unet, pipe.vae):
        install_pointwise_convs(model)


BACKEND = Backend(
    name="channels_last",
    brief="saves 22% of the time at 512x512 and 3% at 1024x1024 with --xformers and CUDA graphs (H100); costs some "
    "decode memory",
    help="NHWC memory layout for UNet and VAE convolutions (cuDNN's NCHW kernels convert to it and back), and each "
    "transformer's output kept in it; 1x1 convolutions run as GEMMs with their bias added as the result is "
    "written. On an H100 with --xformers and CUDA graphs: SD 1.5 at 512x512 0.62 -> 0.48 s "
    "an image, at 1024x1024 0.83 -> 0.80 s; tiled 4K 5.96 -> 5.36 s. Its decode holds 7-17% more than sdrun's NCHW "
    "one, which runs its large convolutions in bands. Measure on your GPU (`sdrun bench`).",
    apply=apply,
)
