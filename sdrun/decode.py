"""`sdrun decode FILE.latents.safetensors`: finish an image whose decode ran out of memory during a run.

The latents file carries the image's full metadata, so the same model is loaded and the PNG gets the same
`parameters` and `sdrun` chunks, plus which memory flags the decode used.
"""

from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sdrun import backends, output, pipeline
from sdrun.config import MAX_SIDE, REPLAY_KEYS, RunConfig, job_record
from sdrun.render.vae import DecodeNotes, decode_latents
from sdrun.console import Reporter
from sdrun.errors import OutputError, UsageError
from sdrun.recorded import check_parameters_keys, read_record

SUFFIX = output.LATENTS_SUFFIX


def decode_file(path: str, target: str | None, overwrite: bool, given: RunConfig) -> Path:
    """Decode with the memory flags, their options and --max-vram given on this command line (`given`)."""
    latents, meta = read_latents(Path(path))
    recorded = read_record(meta, Path(path))
    check_parameters_keys(meta, Path(path))
    job = recorded.job
    if target:  # -o as in a run: a .png file, a folder, or a template
        template = output.template_for(target, several=False)
        image_path = output.render(template, job.seed, 0, job.prompt)
    else:
        image_path = Path(path[: -len(SUFFIX)] + ".png")
    if image_path.exists() and not overwrite:
        raise OutputError(f"{image_path} already exists: pass --overwrite to replace it, or -o another path")
    output.check_writable(image_path.parent)
    run = replace(given, model=recorded.model, config_dir=recorded.config_dir, vae=given.vae or recorded.vae)
    reporter = Reporter(run.quiet)
    engine = pipeline.load(run, reporter, pipeline.check_run(run))
    channels = engine.pipe.vae.config.latent_channels
    if latents.shape[1] != channels:
        raise UsageError(f"{path} holds latents of {latents.shape[1]} channels, but the model {recorded.model} "
                         f"decodes {channels}: it was saved for another model; decode it with that one")
    tiles = backends.vae_tiles(run.backend_options) if "vae_tiling" in run.flags else None
    notes = DecodeNotes()
    pixels = decode_latents(engine, latents.to(engine.device, engine.pipe.unet.dtype), tiles, notes)
    images = engine.pipe.image_processor.postprocess(pixels.float(), output_type="pil")
    # the job's keys as checked, so the PNG's parameters text has each (an optional one missing: its default)
    meta.update({key: value for key, value in job_record(job).items() if key in REPLAY_KEYS})
    meta["decode"] = notes.record()
    meta["decoded_from"] = str(path)
    meta["decode_flags"] = list(engine.flags)
    output.save_png(images[0], image_path, meta, overwrite)
    reporter.result({"status": "ok", "path": str(image_path)})
    return image_path


def read_latents(path: Path):
    """The latents tensor (1, channels, height/8, width/8) and the metadata JSON value of a latents file."""
    if not path.name.endswith(SUFFIX):
        raise UsageError(f"{path} is not a {SUFFIX} file: give the latents file a run saved beside its image")
    try:
        with safe_open(str(path), framework="pt") as file:
            text = (file.metadata() or {})["sdrun"]
            latents = file.get_tensor("latents")
    except (SafetensorError, KeyError, OSError) as error:
        raise UsageError(f"{path} is not a latents file written by sdrun ({error}): it may be truncated")
    if latents.ndim != 4 or latents.shape[0] != 1 or not latents.is_floating_point() \
            or not all(1 <= side <= MAX_SIDE // 8 for side in latents.shape[2:]):
        raise UsageError(f"{path} holds a {latents.dtype} tensor of shape {tuple(latents.shape)}, not the latents "
                         "of one image (1, channels, height/8, width/8): it was damaged, or not written by sdrun; "
                         "make the image again with sdrun PROMPT")
    return latents, output.parse_metadata(text, path)
