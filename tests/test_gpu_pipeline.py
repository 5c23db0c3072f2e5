"""The backends on a GPU, on the tiny model: each flag keeps the image close to the flag-off image, and the
memory flags really lower peak memory. Skipped without CUDA; bench/flags.py measures the full-size model."""

import numpy as np
import pytest
import torch
from sdrun import pipeline
from sdrun.config import Job, RunConfig
from sdrun.console import Reporter
from sdrun.render import vae
from sdrun.render.stages import render

pytestmark = pytest.mark.cuda


def image(flags, job, device="cuda"):
    """The image, the peak memory of its VAE decode stage (bytes), and the decode notes."""
    planned = pipeline.plan_run(RunConfig(model="tiny", flags=flags, device=device), [job])
    engine = pipeline.load(planned.run, Reporter(quiet=True), planned.setup)
    plan = planned[job]
    rendered = render(engine, plan, job, [job.seed])
    decode_stage = [s.name for s in plan.stages].index("decode")
    peak = rendered.stage_peaks[decode_stage] * 2**30 if rendered.stage_peaks else 0
    return np.asarray(rendered.images[0], dtype=np.float32) / 255, peak, rendered.notes


JOB = Job(prompt="a red fox", steps=4, seed=3, width=128, height=128)


@pytest.mark.parametrize("flags", [("channels_last",), ("vae_slicing",), ("vae_tiling",),
                                   ("model_offload",), ("cpu_offload",), ("fp16", "xformers"),
                                   ("fp16", "xformers", "vae_tiling", "model_offload")])
def test_flag_image_is_close_to_plain_gpu_image(flags):
    # fp16 against fp32 is no fair test on random weights (guidance 7.5 amplifies rounding: 0.165 mean difference
    # measured), so flags used with --fp16 are compared with --fp16 alone, and --fp16 with fp32 in the next test.
    plain, _, _ = image(("fp16",) if "fp16" in flags and flags != ("fp16",) else (), JOB)
    flagged, _, _ = image(flags, JOB)
    difference = np.abs(plain - flagged).mean()
    print(flags, "mean abs difference", difference)
    assert difference < 0.02


def test_fp16_image_stays_finite_and_near_fp32():
    plain, _, _ = image((), JOB)
    half, _, notes = image(("fp16",), JOB)
    print("fp16 against fp32: mean abs difference", np.abs(plain - half).mean())
    assert np.isfinite(half).all() and not notes.nan_retry and half.std() > 0.01


def test_gpu_image_matches_cpu_image():
    gpu, _, _ = image((), JOB)
    cpu, _, _ = image((), JOB, device="cpu")
    assert np.abs(gpu - cpu).mean() < 0.01  # the starting noise is drawn on the CPU, so seeds agree across devices


def test_vae_tiling_keeps_the_decode_peak_flat_as_the_image_grows():
    """Tiling's point: the decode's peak stops growing with the image, the untiled one grows with its area. On the
    tiny model one size's ratio says little: the untiled decode runs in bands (a third less memory), and most of a
    tiled peak is not what the tiling keeps (H100, fp16, 1024x1024: untiled 942 MiB, tiled 766, where the live
    tensors alone are 776 against 201 MiB in float32 on the CPU; cuDNN's workspace for a tile's NCHW convolutions is
    the likely rest). So the growth from 1024x1024 to 2048x2048 is compared, the decode called alone on seeded
    latents."""
    planned = pipeline.plan_run(RunConfig(model="tiny", flags=("fp16",), device="cuda"), [JOB])
    engine = pipeline.load(planned.run, Reporter(quiet=True), planned.setup)
    generator = torch.Generator("cuda").manual_seed(3)
    peaks = {}
    for size in (1024, 2048):
        # scaled so that the decoder reads unit-variance values, as from a denoised image, far from fp16's range
        latents = torch.randn(1, 4, size // 2, size // 2, device="cuda", generator=generator, dtype=torch.float16)
        latents *= engine.pipe.vae.config.scaling_factor
        for tiles in (None, (512, 64)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            pixels = vae.decode_latents(engine, latents, tiles, vae.DecodeNotes())
            peaks[size, tiles is not None] = (torch.cuda.max_memory_allocated() - before) / 2**20
            assert pixels.shape[-2:] == (size, size)
            del pixels
    print("decode peaks, MiB:", {key: round(value) for key, value in peaks.items()})
    untiled_growth = peaks[2048, False] - peaks[1024, False]
    assert untiled_growth > 2 * peaks[1024, False]  # the untiled peak grows with the area (4x)
    assert peaks[2048, True] - peaks[1024, True] < 0.1 * untiled_growth


def test_a_folder_read_onto_the_gpu_holds_the_weights_read_into_cpu_memory(tmp_path):
    """pipeline.weights_device's path: a diffusers folder's tensors copied to the GPU from the file's map and
    converted there (the folder is float32, loaded in float16) equal the ones read and converted on the CPU."""
    from sd_layout import tiny_folder

    from sdrun import checkpoint, models
    from sdrun.model_source import resolve_model, weights_files

    source = resolve_model(str(tiny_folder(tmp_path / "tiny-model")))
    on_cpu = models.load_pipeline(source, torch.float16)
    reads = checkpoint.BackgroundReads(weights_files(source.path), torch.float16, torch.device("cuda"))
    on_gpu = models.load_pipeline(source, torch.float16, reads=reads)
    for name in ("unet", "vae", "text_encoder"):
        read = dict(getattr(on_cpu, name).named_parameters())
        moved = dict(getattr(on_gpu, name).named_parameters())
        assert read.keys() == moved.keys() and len(read) > 10
        for key, value in read.items():
            assert moved[key].is_cuda and moved[key].dtype == torch.float16, key
            assert torch.equal(moved[key].cpu(), value), key
