"""Decode rules of the decode stage, called directly: which VAEs decode in a wider dtype up front (SDXL's own,
whose config says force_upcast: it gives NaN in fp16 on real images; bfloat16 where the GPU computes it, else
float32; everything with --vae-fp32), which decode in fp16 with only the overflowing calls or tiles redone in fp32
(the rest: SD 1.x/2.x, SDXL's fp16-fix VAE, a --vae file), and the black retry."""

import types

import numpy as np
import pytest
import torch

from sdrun import models, pipeline
from sdrun.render import stages, vae
from sdrun.render.forwards import forward_replaced


def engine(family: str, vae_dtype: torch.dtype, flags=()):
    pipe = models.build_tiny()
    pipe.vae.to(vae_dtype)
    return pipeline.Engine(pipe, torch.device("cpu"), flags, "tiny", "tiny", family, None, pipe.scheduler)


LATENTS = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))


def decode(engine_, latents=LATENTS):
    notes = vae.DecodeNotes()
    pixels = vae.decode_latents(engine_, latents, None, notes)
    return engine_.pipe.image_processor.postprocess(pixels.float(), output_type="pil"), notes


def test_sdxl_fp16_vae_decodes_in_fp32_without_native_bf16_and_stays_fp16():
    """SDXL's VAE overflows in fp16 (black/NaN images): without native bf16 (here: the CPU) it decodes in fp32, as
    diffusers' SDXL pipeline does."""
    half = engine("sdxl", torch.float16)
    images, notes = decode(half)
    assert notes.vae_fp32 and notes.vae_dtype == "float32" and not notes.nan_retry
    assert half.pipe.vae.dtype == torch.float16  # the weights go back to fp16 for the next image
    reference, _ = decode(engine("sdxl", torch.float32))
    assert np.abs(np.asarray(images[0], np.float32) - np.asarray(reference[0], np.float32)).max() <= 2


def test_sdxl_fp16_vae_decodes_in_bf16_where_the_gpu_computes_it(monkeypatch):
    """bfloat16 has float32's range (no overflow) at fp16's memory. Its pixels stay within bf16's rounding of the
    float32 decode's: on an H200, SDXL's VAE architecture at 1024x1024 was 0.5/255 off on average, 8/255 at most."""
    monkeypatch.setattr(pipeline.Engine, "native_bf16", property(lambda _self: True))
    half = engine("sdxl", torch.float16)
    dtypes = []
    hook = half.pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda m, _a: dtypes.append(m.weight.dtype))
    images, notes = decode(half)
    hook.remove()
    assert dtypes == [torch.bfloat16] and notes.vae_dtype == "bfloat16" and not notes.vae_fp32
    assert half.pipe.vae.dtype == torch.float16
    reference, _ = decode(engine("sdxl", torch.float32))
    error = np.abs(np.asarray(images[0], np.float32) - np.asarray(reference[0], np.float32))
    assert error.mean() <= 1.5 and error.max() <= 12, (error.mean(), error.max())
    monkeypatch.setattr(pipeline.Engine, "native_bf16", property(lambda _self: False))
    assert decode(half)[1].vae_dtype == "float32"


def test_vae_fp32_decodes_any_fp16_vae_in_float32(monkeypatch):
    monkeypatch.setattr(pipeline.Engine, "native_bf16", property(lambda _self: True))
    for family in ("sd1", "sdxl"):
        _, notes = decode(engine(family, torch.float16, flags=("vae_fp32",)))
        assert notes.vae_fp32 and notes.vae_dtype == "float32" and not notes.nan_retry


@pytest.mark.parametrize("family", ["sd1", "sd2", "tiny"])
def test_other_fp16_vaes_decode_in_fp16(family):
    """SD 1.x/2.x VAEs decode fine in fp16; upcasting them cost 0.75-2.5 GiB on the GPU (docs/benchmarks.md)."""
    _, notes = decode(engine(family, torch.float16))
    assert not notes.vae_fp32 and notes.vae_dtype == "float16" and not notes.nan_retry


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
    reference = vae.decode_latents(overflowing, latents, tiles, vae.DecodeNotes())
    overflowing.pipe.vae.to(torch.float16)
    dtypes = []
    conv_in = overflowing.pipe.vae.decoder.conv_in
    hook = conv_in.register_forward_pre_hook(lambda module, _args: dtypes.append(module.weight.dtype))
    notes = vae.DecodeNotes()
    try:
        pixels = vae.decode_latents(overflowing, latents, tiles, notes)
    finally:
        hook.remove()
    # the statistics pass twice (its statistics taken again in fp32), tile 1 twice, the others once
    assert dtypes == [torch.float16, torch.float32] * 2 + [torch.float16] * 3
    assert notes.vae_fp32 and notes.nan_retry and pixels.dtype == torch.float16
    assert overflowing.pipe.vae.dtype == torch.float16
    assert (pixels.float() - reference).abs().max() < 0.01  # as the fp32 decode, to fp16 rounding


def test_black_decode_is_redone(monkeypatch):
    real = vae._vae_decode
    calls = []

    def black_once(model, latents, dtype, tiles, notes):
        calls.append(dtype)
        out = real(model, latents, dtype, tiles, notes)
        return torch.full_like(out, -1.0) if len(calls) == 1 else out

    monkeypatch.setattr(vae, "_vae_decode", black_once)
    images, notes = decode(engine("sd1", torch.float16))
    assert calls == [torch.float16, torch.float32] and notes.nan_retry and notes.vae_fp32
    assert np.asarray(images[0]).std() > 1


def test_nan_latents_fail_with_the_fix():
    half = engine("sd1", torch.float32)
    half.pipe.unet.to(torch.float16)
    with pytest.raises(vae.RenderFailed, match="without --fp16"):
        decode(half, torch.full_like(LATENTS, float("nan")))
    with pytest.raises(vae.RenderFailed, match="broken model weights"):  # fp32: no --fp16 to drop
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
    with forward_replaced(layer, lambda x: x * 0):
        assert (layer(torch.ones(1, 2)) == 0).all() and not calls
    layer(torch.ones(1, 2))
    assert calls == [layer]  # the hook runs again
    plain = torch.nn.Linear(2, 2)
    with forward_replaced(plain, lambda x: x):
        pass
    assert "forward" not in plain.__dict__  # a module without a wrapper is back on its class's forward


def test_a_decode_out_of_memory_takes_back_what_graph_recordings_hold_before_tiling(monkeypatch):
    """Under a tight --max-vram (SD 1.5 at 512x512 under 1.9 GiB on an H200) the recording's memory pool and the
    decode's did not fit together: the recordings go, for the rest of the run, and the same decode is tried again
    before any tiling (which changes pixels)."""
    from sdrun.render.plan import StagePlan

    class Recordings:
        recordings = {"key": "a recording"}
        released = False

        def release(self):
            self.released = True

    held = Recordings()
    half = engine("sd1", torch.float32)
    half.graphs, warnings = held, []
    half.note = warnings.append
    real, calls = vae.decode_latents, []

    def out_of_memory_once(engine_, latents, tiles, notes):
        calls.append(tiles)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(engine_, latents, tiles, notes)

    monkeypatch.setattr(vae, "decode_latents", out_of_memory_once)
    canvas = stages.Canvas(None, [], torch.device("cpu"), stages.Hooks())
    canvas.latents, canvas.notes = LATENTS, vae.DecodeNotes()
    stages.decode(half, None, StagePlan("decode", 256, 256), canvas)
    assert calls == [None, None] and held.released and half.graphs is None
    assert canvas.pixels is not None and not canvas.notes.tiled_retry
    assert len(warnings) == 1 and "CUDA graphs off for the rest of this run" in warnings[0]


def test_an_init_image_that_overflows_the_fp16_encoder_is_encoded_again_in_float32():
    """SDXL's own VAE overflows fp16 encoding as well as decoding (diffusers' SDXL img2img upcasts it): an encode
    whose latents are not finite is redone in float32, and gives the float32 encode's latents."""
    from sdrun.render.plan import StagePlan

    full = engine("sd1", torch.float16)
    with torch.no_grad():  # activations past fp16's range (65504) in the first layer; the norm after it rescales
        full.pipe.vae.encoder.conv_in.weight.mul_(1000)
        full.pipe.vae.encoder.conv_in.bias.fill_(65000)
    full.pipe.vae.to(torch.float32)  # the reference: the same (fp16-rounded) weights in float32

    def encode():
        canvas = stages.Canvas(None, [], torch.device("cpu"), stages.Hooks())
        canvas.pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return stages.encode_image(full, None, StagePlan("encode_image", 64, 64), canvas)

    reference = encode().latents
    full.pipe.vae.to(torch.float16)
    dtypes = []
    hook = full.pipe.vae.encoder.conv_in.register_forward_pre_hook(lambda m, _a: dtypes.append(m.weight.dtype))
    canvas = encode()
    hook.remove()
    assert dtypes == [torch.float16, torch.float32] and canvas.notes.nan_retry and canvas.notes.vae_fp32
    assert full.pipe.vae.dtype == torch.float16 and torch.isfinite(canvas.latents).all()
    assert torch.allclose(canvas.latents.float(), reference.float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family, flags, native", [("sdxl", (), True), ("sdxl", (), False),
                                                   ("sdxl", ("vae_fp32",), True), ("sd1", (), True),
                                                   ("sd1", ("vae_fp32",), False)])
def test_the_plan_predicts_the_dtype_the_vae_computes_in(monkeypatch, family, flags, native):
    """The plan prices the decode by the VAE's dtype before loading (plan._build); vae.vae_dtype decides it on the
    loaded VAE. The two must agree, or --max-vram's decode would be planned at the wrong size."""
    from sdrun.config import Job, RunConfig
    from sdrun.render import plan as render_plan

    monkeypatch.setattr(pipeline.Engine, "native_bf16", property(lambda _self: native))
    info = render_plan.ModelInfo(family, 1024 if family == "sdxl" else 512, 8)
    planned = render_plan.make_plan(RunConfig(flags=("fp16", *flags)), Job(prompt="x"), info, "cuda",
                                    native_bf16=native)
    running = vae.vae_dtype(engine(family, torch.float16, flags=("fp16", *flags)))
    assert planned.vae_dtype == str(running).removeprefix("torch.")


def test_the_banded_decode_gives_the_whole_decode_and_leaves_what_it_should_alone(monkeypatch):
    """render/banded_decode.py: the decoder's large convolutions in bands of rows (each with the rows its kernel
    reaches), its SiLU in place: the same pixels as the whole decode. A channels-last decoder and a convolution
    under an offload hook keep their own forward."""
    from sdrun.render import banded_decode

    decoder = models.build_tiny().vae.decoder.eval()
    latents = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(2))
    # the tiny decoder's largest activations: 64 channels of 64x96 in float32, 1.5 MiB: 6 bands of 256 KiB
    monkeypatch.setattr(banded_decode, "BAND_BYTES", 256 * 1024)
    calls = []  # the rows of every band the banded convolutions compute
    functional = torch.nn.functional
    counting = types.SimpleNamespace(pad=functional.pad,
                                     conv2d=lambda x, *a, **k: calls.append(x.shape[-2]) or functional.conv2d(x, *a, **k))
    monkeypatch.setattr(banded_decode, "F", counting)
    with torch.no_grad():
        whole = decoder(latents)
        with banded_decode.banded(decoder):
            bands = decoder(latents)
        after = decoder(latents)
    assert calls and max(calls) <= 64 // 2 + 2  # at most half of the 64 rows at a time, and a halo row each side
    assert torch.allclose(bands, whole, atol=1e-5) and torch.equal(after, whole)  # and every forward put back
    calls.clear()
    decoder.up_blocks[0].resnets[0].conv1._hf_hook = object()  # as accelerate marks a hooked module
    decoder.to(memory_format=torch.channels_last)
    with torch.no_grad(), banded_decode.banded(decoder):
        assert torch.allclose(decoder(latents), whole, atol=1e-5)
    assert calls == []  # channels-last: nothing banded
    decoder.to(memory_format=torch.contiguous_format)
    with banded_decode.banded(decoder):
        assert "forward" not in decoder.up_blocks[0].resnets[0].conv1.__dict__  # hooked: left alone
        assert "forward" in decoder.up_blocks[0].resnets[1].conv1.__dict__


@pytest.mark.parametrize("flags, resident, straight", [
    (("fp16", "xformers", "channels_last"), None, True),
    (("fp16", "vae_tiling"), None, True),
    (("fp16", "model_offload"), None, False),  # the offloads place the pipeline themselves
    (("fp16", "cpu_offload"), None, False),
    (("fp16", "fp8"), None, False),  # stored anew on the CPU: the device never holds the fp16 UNet too
    (("fp16", "fp8_text_encoders"), None, False),
    (("fp16",), 1.5, False),  # --max-vram's partial residency streams part of the UNet from the CPU
])
def test_weights_are_read_onto_the_gpu_only_when_the_pipeline_goes_there_as_loaded(flags, resident, straight):
    from sdrun import backends, model_source

    setup = pipeline.RunSetup(model_source.resolve_model("tiny"), torch.device("cuda"), backends.select(flags),
                              unet_resident_gib=resident)
    assert pipeline.weights_device(setup) == (torch.device("cuda") if straight else None)
    on_cpu = pipeline.RunSetup(setup.source, torch.device("cpu"), setup.chosen)
    assert pipeline.weights_device(on_cpu) is None
