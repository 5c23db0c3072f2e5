"""--xformers (alias --mem-efficient-attention): sdrun's bundled CUDA kernels, not the xformers package: its
attention, its GroupNorm fused with the SiLU after it (sdrun/ops/norms.py) in the UNet and the VAE, and in the UNet
GEGLU's gate in one pass (sdrun/ops/feed_forward.py) and LayerNorm fused with the residual addition before it
(sdrun/ops/layer_norms.py).

Attention modules the kernel does not cover (the VAE's single 512-wide head) stay on PyTorch attention; that is
decided once, in `install`, and reported in one line. The kernel's module is imported only when the flag is used
or `sdrun info` asks, so plain runs never pay for it.
"""

from sdrun.backends.base import Backend

# For `sdrun info`: what `ops.processor.install` puts on the kernel and what it leaves, and why (its InstallReport
# names the modules of a run)
COVERAGE = ("every self- and cross-attention module of the UNet, an IP-Adapter's included (its text and its image "
            "attention, one kernel call each); left on PyTorch SDPA: modules whose head_dim is over 256 or not a "
            "multiple of 8 (the VAE's single 512-wide head) and modules with other processors or added key/value "
            "projections; each --xformers run names them")
# ... and what `ops.norms.install_fused_norms` puts on its GroupNorm kernel
NORM_COVERAGE = ("every GroupNorm of the UNet and the VAE: a ResNet block's two and the output norms fused with the "
                 "SiLU after them (the UNet's second also adding the time embedding), a transformer's or attention's "
                 "input norm alone; each call whose layout the kernel cannot read (an NCHW activation of a pixel "
                 "count that is not a multiple of 8), and a tiled VAE's (shared statistics), runs on PyTorch's "
                 "GroupNorm instead")
# ... and what `ops.feed_forward.install_fused_geglu` puts on its GEGLU kernel
GEGLU_COVERAGE = ("every GEGLU of the UNet's feed-forward layers (the transformer blocks of SD 1.x, 2.x and SDXL): "
                  "the projection's two halves gated in one pass")
# ... and what `ops.layer_norms.install_fused_layer_norms` puts on its LayerNorm kernel
LAYER_NORM_COVERAGE = ("the three LayerNorms of every UNet transformer block of SD 1.x, 2.x and SDXL, the second and "
                       "third adding the residual (attention's output) in the same pass; rows the kernel cannot "
                       "read (not contiguous, or a width that is not a multiple of 8) run on PyTorch's LayerNorm")


def unavailable_reasons(device):
    from sdrun import ops

    return ops.unavailable_reasons(device)


def prepare(_device):
    from sdrun import ops

    ops.load()  # builds the kernel on first use; fails here, before the model loads, if it cannot


def apply(pipe, _device):
    from sdrun.ops.feed_forward import install_fused_geglu
    from sdrun.ops.layer_norms import install_fused_layer_norms
    from sdrun.ops.norms import install_fused_norms
    from sdrun.ops.processor import install

    notes = [install(pipe).summary(), install_fused_norms(pipe.unet).summary()]
    vae_norms = install_fused_norms(pipe.vae, "VAE")
    if vae_norms.fused_with_silu + vae_norms.plain + len(vae_norms.left):  # AutoencoderTiny has none
        notes.append(vae_norms.summary())
    return "; ".join(notes + [f"{install_fused_geglu(pipe.unet)} GEGLUs gate in one pass",
                              f"{install_fused_layer_norms(pipe.unet)} transformer blocks add their residuals in "
                              "their LayerNorms"])


def placed(pipe):
    from sdrun.ops.norms import pack_time_projections
    from sdrun.ops.processor import pack_projections

    attention, resnets = pack_projections(pipe.unet), pack_time_projections(pipe.unet)
    if not attention + resnets:  # every layer wrapped (LoRA) or hooked
        return None
    return f"{attention} attention modules project their inputs with one GEMM, {resnets} ResNet blocks their " \
        "time embedding with one GEMM a step"


BACKEND = Backend(
    name="xformers",
    brief="saves attention memory (linear in image area) and 40% of a UNet step at 512x512 (H100, with "
    "--channels-last); costs a 30 s build on first use",
    help="sdrun's own kernels (built for your torch; no xformers package needed): memory-efficient attention, "
    "memory linear in image area like PyTorch's SDPA, on an H100 1.10-1.45x PyTorch's fastest; the UNet's and "
    "the VAE's GroupNorms fused with the SiLU after them (and with the bias of the convolution before them); "
    "GEGLU's gate in one pass; LayerNorm with the residual addition before it; each attention's q, k and v, and "
    "every ResNet block's time embedding, projected by one GEMM. With --channels-last one UNet step at 512x512 "
    "went from 10.65 ms (diffusers' modules) to 6.43 ms on an H100, and an image through the CLI takes 0.356 s "
    "against plain diffusers' 1.43 s (before the LayerNorm kernel). First use compiles them (about 35 s).",
    apply=apply,
    prepare=prepare,
    placed=placed,
    needs_cuda=True,
    extra_reasons=unavailable_reasons,
)
