"""Decode rules of the decode stage, called directly: which VAEs are upcast to fp32 up front (SDXL's own, whose
config says force_upcast: it gives NaN in fp16 on real images), which decode in fp16 with only the overflowing
calls or tiles redone in fp32 (the rest: SD 1.x/2.x, SDXL's fp16-fix VAE, a --vae file), and the black retry."""

import numpy as np
import pytest
import torch

from sdrun import models, pipeline
from sdrun.render import stages


def engine(family: str, vae_dtype: torch.dtype):
    pipe = models.build_tiny()
    pipe.vae.to(vae_dtype)
    return pipeline.Engine(pipe, torch.device("cpu"), (), "tiny", "tiny", family, None, pipe.scheduler)


LATENTS = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))


def decode(engine_, latents=LATENTS):
    notes = stages.DecodeNotes()
    pixels = stages.decode_latents(engine_, latents, None, notes)
    return engine_.pipe.image_processor.postprocess(pixels.float(), output_type="pil"), notes


def test_sdxl_fp16_vae_decodes_in_fp32_and_stays_fp16():
    """SDXL's VAE overflows in fp16 (black/NaN images), so it decodes in fp32, as diffusers' SDXL pipeline does."""
    half = engine("sdxl", torch.float16)
    images, notes = decode(half)
    assert notes.vae_fp32 and not notes.nan_retry
    assert half.pipe.vae.dtype == torch.float16  # the weights go back to fp16 for the next image
    reference, _ = decode(engine("sdxl", torch.float32))
    assert np.abs(np.asarray(images[0], np.float32) - np.asarray(reference[0], np.float32)).max() <= 2


@pytest.mark.parametrize("family", ["sd1", "sd2", "tiny"])
def test_other_fp16_vaes_decode_in_fp16(family):
    """SD 1.x/2.x VAEs decode fine in fp16; upcasting them cost 0.75-2.5 GiB on the GPU (docs/benchmarks.md)."""
    _, notes = decode(engine(family, torch.float16))
    assert not notes.vae_fp32 and not notes.nan_retry


def test_an_sdxl_vae_whose_config_drops_force_upcast_decodes_in_fp16():
    """The fp16-fix VAE's config says force_upcast false: it decodes in fp16, at half the fp32 decode's memory."""
    fixed = engine("sdxl", torch.float16)
    fixed.pipe.vae.register_to_config(force_upcast=False)
    _, notes = decode(fixed)
    assert not notes.vae_fp32 and not notes.nan_retry


def test_a_vae_file_has_no_force_upcast_of_its_own(tmp_path):
    """A single VAE file has no config: it takes the model's, but is tried in fp16 (sdrun/vae_file.py)."""
    from safetensors.torch import save_file

    from sdrun.vae_file import replace_vae

    pipe = models.build_tiny()
    assert pipe.vae.config.force_upcast
    save_file({key: value.contiguous() for key, value in pipe.vae.state_dict().items()}, tmp_path / "vae.safetensors")
    replace_vae(pipe, tmp_path / "vae.safetensors", torch.float16)
    assert not pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float16


def overflowing_engine():
    """The tiny engine with a decoder whose first convolution overflows fp16 on latents of 500 (not in fp32)."""
    full = engine("sd1", torch.float32)
    with torch.no_grad():
        full.pipe.vae.decoder.conv_in.weight.mul_(100)
    return full


def test_only_the_tiles_that_overflow_in_fp16_are_redone_in_fp32():
    latents = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    latents[:, :, :8, :8] = 500  # inside the first of four 64-pixel tiles only (and the shrunk statistics pass)
    tiles = (64, 16)
    overflowing = overflowing_engine()
    reference = stages.decode_latents(overflowing, latents, tiles, stages.DecodeNotes())
    overflowing.pipe.vae.to(torch.float16)
    dtypes = []
    conv_in = overflowing.pipe.vae.decoder.conv_in
    hook = conv_in.register_forward_pre_hook(lambda module, _args: dtypes.append(module.weight.dtype))
    notes = stages.DecodeNotes()
    try:
        pixels = stages.decode_latents(overflowing, latents, tiles, notes)
    finally:
        hook.remove()
    # the statistics pass twice (its statistics taken again in fp32), tile 1 twice, the others once
    assert dtypes == [torch.float16, torch.float32] * 2 + [torch.float16] * 3
    assert notes.vae_fp32 and notes.nan_retry and pixels.dtype == torch.float16
    assert overflowing.pipe.vae.dtype == torch.float16
    assert (pixels.float() - reference).abs().max() < 0.01  # as the fp32 decode, to fp16 rounding


def test_black_decode_is_redone(monkeypatch):
    real = stages._vae_decode
    calls = []

    def black_once(vae, latents, fp32, tiles, notes):
        calls.append(fp32)
        out = real(vae, latents, fp32, tiles, notes)
        return torch.full_like(out, -1.0) if len(calls) == 1 else out

    monkeypatch.setattr(stages, "_vae_decode", black_once)
    images, notes = decode(engine("sd1", torch.float16))
    assert calls == [False, True] and notes.nan_retry and notes.vae_fp32
    assert np.asarray(images[0]).std() > 1


def test_nan_latents_fail_with_the_fix():
    half = engine("sd1", torch.float32)
    half.pipe.unet.to(torch.float16)
    with pytest.raises(stages.RenderFailed, match="without --fp16"):
        decode(half, torch.full_like(LATENTS, float("nan")))
    with pytest.raises(stages.RenderFailed, match="broken model weights"):  # fp32: no --fp16 to drop
        decode(engine("sd1", torch.float32), torch.full_like(LATENTS, float("nan")))


def test_a_replaced_forward_comes_back_with_the_offload_hook_it_replaced():
    """The decode's fp32 guard and the chunked feed-forward swap a module's forward for a while: a module that an
    offload hook wraps (--model-offload hooks the VAE's decoder) keeps its hook afterwards."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    layer = torch.nn.Linear(2, 2)
    add_hook_to_module(layer, Counting())
    with stages.forward_replaced(layer, lambda x: x * 0):
        assert (layer(torch.ones(1, 2)) == 0).all() and not calls
    layer(torch.ones(1, 2))
    assert calls == [layer]  # the hook runs again
    plain = torch.nn.Linear(2, 2)
    with stages.forward_replaced(plain, lambda x: x):
        pass
    assert "forward" not in plain.__dict__  # a module without a wrapper is back on its class's forward
