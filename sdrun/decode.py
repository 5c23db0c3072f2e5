"""`sdrun decode FILE.latents.safetensors`: finish an image whose decode ran out of memory during a run.

The latents file carries the image's full metadata, so the same model is loaded and the PNG gets the same
`parameters` and `sdrun` chunks, plus which memory flags the decode used.
"""

import json
from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sdrun import backends, output, pipeline
from sdrun.config import RunConfig
from sdrun.render.stages import DecodeNotes, decode_latents
from sdrun.console import Reporter
from sdrun.errors import OutputError, UsageError

SUFFIX = output.LATENTS_SUFFIX


def decode_file(path: str, target: str | None, overwrite: bool, given: RunConfig) -> Path:
    """Decode with the memory flags, their options and --max-vram given on this command line (`given`)."""
    latents, meta = read_latents(Path(path))
    if target:  # -o as in a run: a .png file, a folder, or a template
        template = output.template_for(target, several=False)
        image_path = output.render(template, meta.get("seed", 0), 0, str(meta.get("prompt", "")))
    else:
        image_path = Path(path[: -len(SUFFIX)] + ".png")
    if image_path.exists() and not overwrite:
        raise OutputError(f"{image_path} already exists: pass --overwrite to replace it, or -o another path")
    output.check_writable(image_path.parent)
    run = replace(given, model=meta["model"], config_dir=meta.get("config_dir"), vae=given.vae or meta.get("vae"))
    reporter = Reporter(run.quiet)
    engine = pipeline.load(run, reporter, pipeline.check_run(run))
    tiles = backends.vae_tiles(run.backend_options) if "vae_tiling" in run.flags else None
    notes = DecodeNotes()
    pixels = decode_latents(engine, latents.to(engine.device, engine.pipe.unet.dtype), tiles, notes)
    images = engine.pipe.image_processor.postprocess(pixels.float(), output_type="pil")
    meta["decode"] = {"vae_fp32": notes.vae_fp32, "nan_retry": notes.nan_retry, "tiled_retry": False}
    meta["decoded_from"] = str(path)
    meta["decode_flags"] = list(engine.flags)
    output.save_png(images[0], image_path, meta, overwrite)
    reporter.result({"status": "ok", "path": str(image_path)})
    return image_path


def read_latents(path: Path):
    if not path.name.endswith(SUFFIX):
        raise UsageError(f"{path} is not a {SUFFIX} file: give the latents file a run saved beside its image")
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = json.loads((file.metadata() or {})["sdrun"])
            return file.get_tensor("latents"), meta
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise UsageError(f"{path} is not a latents file written by sdrun ({error}): it may be truncated")
