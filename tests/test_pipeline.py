"""Decode rules of the decode stage, called directly: which VAEs are upcast to fp32, and the NaN/black retry."""

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
    with pytest.raises(stages.RenderFailed, match="without --fp16"):
        decode(engine("sd1", torch.float32), torch.full_like(LATENTS, float("nan")))
