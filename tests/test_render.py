"""The render engine on the tiny model, through the real CLI: sdrun's own loop gives diffusers' images, img2img,
tiled diffusion, hires, the plan and its checks (issue 8)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, pixels, meta
from sdrun import models
from sdrun.config import Job, RunConfig
from sdrun.errors import UsageError
from sdrun.render import plan as render_plan
from sdrun.render.tiling import Windows, weight_maps
from sdrun.schedulers import SAMPLERS, make_scheduler


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = models.build_tiny()
    pipe.model_scheduler_config = pipe.scheduler.config  # each test's scheduler is built from the model's own
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", sorted(SAMPLERS))
def test_text_to_image_equals_diffusers_own_pipeline(sdrun, tiny_pipe, scheduler):
    """sdrun's loop over the scheduler gives the image diffusers' text-to-image call gives (every scheduler,
    guidance on, a negative prompt, a non-square size, two images in one batch)."""
    args = ("a red fox", "--model", "tiny", "--steps", "3", "--seed", "5", "--scheduler", scheduler,
            "--negative-prompt", "blurry", "-W", "72", "-H", "56", "-n", "2", "--batch-size", "2", "-o", "s-{seed}.png")
    result = sdrun(*args)
    assert result.exit_code == 0, result
    tiny_pipe.scheduler = make_scheduler(scheduler, tiny_pipe.model_scheduler_config)
    reference = tiny_pipe("a red fox", negative_prompt="blurry", num_inference_steps=3, width=72, height=56,
                          num_images_per_prompt=2, guidance_scale=7.5, output_type="np",
                          generator=[torch.Generator().manual_seed(seed) for seed in (5, 6)]).images
    for k, seed in enumerate((5, 6)):
        assert np.abs(pixels(f"s-{seed}.png") - reference[k]).max() <= 1 / 255 + 1e-6, scheduler


def test_a_prompt_is_encoded_once_for_the_chunks_that_repeat_it(sdrun, monkeypatch):
    """A batch of one prompt encodes it once, however many chunks it renders in, and its images are those of chunks
    that each encode it; another prompt is encoded anew, and the first again after it."""
    from sdrun.render import prompts

    calls = []
    encode = prompts.encode
    monkeypatch.setattr(prompts, "encode", lambda pipe, family, text, *rest: calls.append(text) or
                        encode(pipe, family, text, *rest))
    lines = [{"prompt": "a red fox"}, {"prompt": "a red fox", "seed": 9}, {"prompt": "a blue fox"},
             {"prompt": "a red fox"}]
    Path("prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = sdrun("--prompt-file", "prompts.jsonl", *TINY, "--seed", "4", "-n", "2", "--json", "-o", "{index}.png")
    assert result.exit_code == 0, result
    assert len(result.records()) == 8  # in 8 chunks of one image
    assert calls == ["a red fox", "a blue fox", "a red fox"]
    monkeypatch.setattr(prompts, "encode", encode)
    assert sdrun("a red fox", *TINY, "--seed", "10", "-o", "alone.png").exit_code == 0
    second = next(r["path"] for r in result.records() if r["seed"] == 10)  # line 2's second image
    assert np.array_equal(pixels("alone.png"), pixels(second))


def test_img2img_strength_one_is_text_to_image_and_zero_returns_the_image(sdrun, tiny_pipe):
    common = ("a lighthouse", *TINY, "--seed", "3")
    assert sdrun(*common, "-o", "t2i.png").exit_code == 0
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save("init.png")
    assert sdrun(*common, "--init-image", "init.png", "--strength", "1", "-o", "s1.png").exit_code == 0
    assert np.array_equal(pixels("s1.png"), pixels("t2i.png"))
    result = sdrun(*common, "--init-image", "init.png", "--strength", "0", "-o", "s0.png")
    assert result.exit_code == 0, result
    # strength 0 runs no step: the image comes back through the VAE (encode, then decode) unchanged otherwise
    init = tiny_pipe.image_processor.preprocess(Image.open("init.png").convert("RGB"))
    with torch.no_grad():
        round_trip = tiny_pipe.vae.decode(tiny_pipe.vae.encode(init).latent_dist.mode()).sample
    expected = tiny_pipe.image_processor.postprocess(round_trip, output_type="np")[0]
    assert np.abs(pixels("s0.png") - expected).max() <= 1 / 255 + 1e-6
    assert sdrun(*common, "--init-image", "init.png", "--strength", "0.5", "-o", "s5.png").exit_code == 0
    half = pixels("s5.png")
    assert not np.array_equal(half, pixels("s0.png")) and not np.array_equal(half, pixels("t2i.png"))
    assert meta("s5.png")["strength"] == 0.5 and "Denoising strength: 0.5" in Image.open("s5.png").text["parameters"]


def test_tiled_diffusion_with_one_window_is_the_untiled_pass_and_more_windows_blend(sdrun):
    common = ("a forest", *TINY, "--seed", "2", "-W", "96", "-H", "64")
    assert sdrun(*common, "-o", "plain.png").exit_code == 0
    assert sdrun(*common, "--tiled-diffusion", "--window-size", "96", "-o", "one.png").exit_code == 0
    assert np.array_equal(pixels("plain.png"), pixels("one.png"))
    result = sdrun(*common, "--tiled-diffusion", "--window-size", "48", "--window-overlap", "16",
                   "--window-batch", "2", "-o", "many.png")
    assert result.exit_code == 0, result
    many = pixels("many.png")
    assert not np.array_equal(many, pixels("plain.png")) and np.isfinite(many).all() and many.std() > 0.01
    assert "windows of 24 latents" in " ".join(meta("many.png")["render"]["stages"])


def test_window_weights_are_a_partition_of_unity_with_one_window_all_ones():
    windows = Windows(height=40, width=70, size=24, overlap=8, batch=4)
    total = torch.zeros(40, 70, dtype=torch.float64)
    for (top, left, h, w), weights in zip(windows.boxes(), weight_maps(windows)):
        assert weights.min() > 0
        total[top:top + h, left:left + w] += weights
    assert torch.allclose(total, torch.ones_like(total))  # two neighbours' ramps add up to 1 on their overlap
    (only,) = weight_maps(Windows(height=20, width=30, size=32, overlap=8, batch=1))
    assert only.shape == (20, 30) and bool((only == 1).all())


def test_hires_writes_the_target_size_from_a_native_base(sdrun):
    result = sdrun("a valley", *TINY, "--seed", "1", "--hires", "160x96", "--hires-strength", "0.5", "-o", "h.png",
                   "--vae-tiling", "--tile-size", "64", "--tile-overlap", "16")  # several tiles at 160x96
    assert result.exit_code == 0, result
    with Image.open("h.png") as image:
        assert image.size == (160, 96)
        assert "Hires resize: 160x96" in image.text["parameters"]
    info = meta("h.png")
    assert info["hires"] == "160x96" and info["width"] * info["height"] <= 64 * 64 * 1.1  # base at native area
    stages = info["render"]["stages"]
    assert [s.split()[0] for s in stages] == ["encode_prompt", "prepare_latents", "denoise", "decode", "upscale",
                                            "encode_image", "prepare_latents", "denoise", "decode"]
    assert "windows" in stages[7] and "in tiles" in stages[8]


def test_plan_and_dry_run_load_no_weights(sdrun, monkeypatch, isolated):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load_pipeline", no_loading)
    result = sdrun("plan", "a city", *TINY, "-W", "256", "-H", "128", "--tiled-diffusion")
    assert result.exit_code == 0, result
    assert "denoise 256x128, 2 steps" in result.stdout and "windows" in result.stdout
    result = sdrun("a city", *TINY, "--dry-run", "--hires", "256x256")
    assert result.exit_code == 0, result
    assert "upscale 256x256" in result.stdout
    cuda = sdrun("plan", "a city", "-W", "3840", "-H", "2160", "--device", "cuda", "--fp16", "--max-vram", "4")
    assert cuda.exit_code == 0, cuda
    assert "GiB" in cuda.stdout and "--max-vram 4 added" in cuda.stderr
    assert not list(isolated.rglob("*.png"))


@pytest.mark.parametrize("args, message", [
    (("--vae-tiling", "--tile-size", "128", "--tile-overlap", "64"), "must be less than half of --tile-size"),
    (("--tile-size", "128"), "--tile-size needs --vae-tiling"),
    (("--tiled-diffusion", "--window-size", "64", "--window-overlap", "64"), "must be less than --window-size"),
    (("--hires", "32x32"), "is smaller than the base size"),
    (("--hires", "4k"), "WIDTHxHEIGHT"),
    (("--strength", "1.5"), "strength 1.5 is outside 0..1"),
    (("--init-image", "missing.png"), "does not exist"),
    (("--init-image", "notes.txt"), "is not an image sdrun can read"),
    (("--guidance", "nan"), "is not a finite number"),
    (("--max-vram", "4"), "this run is on the CPU"),
])
def test_bad_render_values_are_one_line_errors_before_any_work(sdrun, monkeypatch, isolated, args, message):
    Path("notes.txt").write_text("not an image")
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    result = sdrun("a fox", *TINY, *args)
    assert result.exit_code == 2, result
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (isolated / "outputs").exists()


def test_max_vram_below_every_setting_is_refused_and_a_fitting_one_adds_settings():
    info = render_plan.ModelInfo("sd1", 512, 8)
    job = Job(prompt="x", width=3840, height=2160)
    with pytest.raises(UsageError, match="below what any setting reaches"):
        render_plan.make_plan(RunConfig(max_vram=0.5), job, info, "cuda", budget=0.5)
    fitted = render_plan.make_plan(RunConfig(max_vram=4), job, info, "cuda", budget=4)
    assert fitted.peak_gib <= 4 and {"exact", "fp16", "vae_tiling"} <= set(fitted.added)
    roomy = render_plan.make_plan(RunConfig(max_vram=80, flags=("fp16",)), job, info, "cuda", budget=80)
    assert roomy.added == () and not roomy.chunked_feed_forward


def test_sdxl_decode_is_planned_in_the_dtype_it_runs_in():
    """SDXL's own VAE decodes in float32 without native bf16 or with --vae-fp32 (vae.vae_dtype), in bfloat16 on a
    GPU that computes it natively, and a --vae file in fp16 first. Planned at fp16 values while it ran in float32,
    `--max-vram 8` once ran out of memory in its decode. On an H200, `sdrun --fp16` SDXL at 1024x1024 (bf16, in
    bands) peaked at 8.13 GiB in its decode (docs/benchmarks.md, fourth session); float32 takes twice the bytes."""
    info = render_plan.ModelInfo("sdxl", 1024, 8)
    job = Job(prompt="x", width=1024, height=1024)

    def decode_gib(native_bf16=True, **run):
        plan = render_plan.make_plan(RunConfig(**{"flags": ("fp16",), **run}), job, info, "cuda",
                                     native_bf16=native_bf16)
        return next(stage for stage in plan.stages if stage.name == "decode").peak_gib

    fp32 = decode_gib(native_bf16=False)
    assert decode_gib(flags=("fp16", "vae_fp32")) == fp32
    assert decode_gib() < fp32 - 1.5 and decode_gib(vae="fixed.safetensors") < fp32 - 1.5
    assert abs(decode_gib() - 8.13) <= 0.15 * 8.13


def test_the_banded_decode_is_planned_at_its_measured_share_and_fp8_then_fits_without_streaming():
    """On an H200, SD 1.5's untiled decode at 512x512 held 610 MiB above the weights whole, 418 with its large
    convolutions in bands (memory.BANDED_DECODE_SHARE), 448 in channels-last (left whole). So a budget that the
    fp16 weights miss by the decode takes fp8 and no streaming (4x slower), and channels-last no longer lowers it."""
    info = render_plan.ModelInfo("sd1", 512, 8)
    job = Job(prompt="x")

    def decode_gib(flags):
        plan = render_plan.make_plan(RunConfig(flags=flags), job, info, "cuda")
        return next(stage for stage in plan.stages if stage.name == "decode").peak_gib

    whole = 1220 * 512 * 512 * 2 / 2**30  # memory.ARCHITECTURES' per-pixel figure, calibrated on the whole decode
    assert decode_gib(("fp16", "fp8", "channels_last")) - decode_gib(("fp16", "fp8")) == pytest.approx(
        whole * (0.84 - 0.69), abs=0.005)
    assert decode_gib(("fp16", "fp8", "vae_tiling")) == decode_gib(("fp16", "fp8"))  # inside one tile: whole
    fitted = render_plan.make_plan(RunConfig(max_vram=1.9), job, info, "cuda", budget=1.9)
    assert "fp8" in fitted.flags and "channels_last" not in fitted.flags and fitted.unet_resident_gib is None
    assert fitted.peak_gib <= 1.9 * render_plan.HEADROOM


def test_memory_saving_settings_give_the_same_prediction(tiny_pipe, monkeypatch):
    """Chunked feed-forward and guidance halves one after the other are the "exact" settings --max-vram adds first:
    the denoiser's output must not change beyond rounding."""
    from sdrun.render import sampling, stages

    unet = tiny_pipe.unet
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 48, generator=generator)
    cond = sampling.Conditioning(torch.randn(4, 77, unet.config.cross_attention_dim, generator=generator))
    t = torch.tensor(500)
    model = sampling.unet_model(unet, cond)
    with torch.no_grad():
        batched = sampling.guided(model, cond, 7.5, sequential=False)(x, t)
        sequential = sampling.guided(model, cond, 7.5, sequential=True)(x, t)
        monkeypatch.setattr(stages, "FEED_FORWARD_CHUNK", 100)  # its transformer level: 384 tokens, 4 chunks
        with stages.chunked_feed_forward(unet, True):
            chunked = sampling.guided(model, cond, 7.5, sequential=True)(x, t)
        after = sampling.guided(model, cond, 7.5, sequential=False)(x, t)
    assert torch.allclose(batched, sequential, atol=1e-5) and torch.allclose(batched, chunked, atol=1e-5)
    assert torch.equal(after, batched)  # the patch is undone
    assert batched.abs().mean() > 0.01


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from sd_layout import tiny_sdxl

    folder = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl().save_pretrained(folder)
    return folder


def test_sdxl_text_to_image_equals_diffusers_and_hires_refines_at_the_target(sdrun, sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    args = ("a red fox", "--model", sdxl_folder, "--steps", "3", "--seed", "5", "-W", "72", "-H", "56")
    assert sdrun(*args, "--negative-prompt", "blurry", "-o", "xl.png").exit_code == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a red fox", negative_prompt="blurry", num_inference_steps=3, width=72, height=56,
                     guidance_scale=7.5, output_type="np", generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(pixels("xl.png") - reference).max() <= 1 / 255 + 1e-6
    result = sdrun("a red fox", "--model", sdxl_folder, "--steps", "2", "--seed", "5", "--hires", "128x96",
                   "--hires-strength", "0.5", "-o", "xl-hires.png")
    assert result.exit_code == 0, result
    with Image.open("xl-hires.png") as image:
        assert image.size == (128, 96)


def test_guidance_halves_come_after_fp8_where_one_pass_does_not_fill_the_gpu():
    """On an H200, SDXL at 1024x1024 under --max-vram 8 took 1.75 s with the guidance halves one after the other and
    VAE tiles, 1.50 s with fp8 alone (1.41 s with no budget): at <= 128x128 latents the "exact" settings come after
    fp8 and channels-last. At 4K one image's pass fills the GPU, and they stay first (the same image)."""
    sdxl = render_plan.ModelInfo("sdxl", 1024, 8)
    fitted = render_plan.make_plan(RunConfig(max_vram=8, flags=("fp16",)), Job(prompt="x", width=1024, height=1024),
                                   sdxl, "cuda", budget=8)
    assert fitted.added == ("fp8",) and not fitted.sequential_guidance and fitted.peak_gib <= 8 * render_plan.HEADROOM
    names = [name for name, _why in render_plan.escalation(render_plan.Sizes((1024, 1024), None), sdxl)]
    assert names.index("exact") == names.index("partial") - 1 and names.index("fp8") < names.index("exact")
    sd1 = render_plan.ModelInfo("sd1", 512, 8)
    assert render_plan.escalation(render_plan.Sizes((3840, 2160), None), sd1) == render_plan.ESCALATION
    assert render_plan.escalation(render_plan.Sizes((512, 512), (3840, 2160)), sd1) == render_plan.ESCALATION
