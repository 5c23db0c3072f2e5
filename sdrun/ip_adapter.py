"""IP-Adapter: an image prompt beside the text one (`--ip-adapter FILE --ip-image IMG [--ip-scale S]`).

FILE is an IP-Adapter in h94/IP-Adapter's layout (`image_proj.*` and `ip_adapter.*` tensors, .safetensors or
.bin); its CLIP image encoder is a transformers folder, by default `image_encoder/` beside FILE as in that
repository (`--ip-image-encoder DIR` otherwise). Loading goes through diffusers (`load_ip_adapter`), which sets
new attention processors: `--xformers` turns them into sdrun's (text and image attention on its kernel) whether it
applies after the adapter loads (as in a run) or before (then `load` installs the kernel again). One image and one
scale serve the whole run.
"""

from pathlib import Path

import click

from sdrun.errors import ModelError, UsageError


def options(fn):
    for option in reversed([
        click.option("--ip-adapter", type=click.Path(dir_okay=False), metavar="FILE",
                     help="An IP-Adapter (h94/IP-Adapter layout): --ip-image steers every image of the run."),
        click.option("--ip-image", type=click.Path(dir_okay=False), metavar="IMG", help="The image prompt."),
        click.option("--ip-scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="How strongly --ip-image steers (0: not at all)."),
        click.option("--ip-image-encoder", type=click.Path(file_okay=False), metavar="DIR",
                     help="The CLIP image encoder folder  [default: image_encoder/ beside --ip-adapter]."),
    ]):
        fn = option(fn)
    return fn


def pop_options(options: dict) -> dict:
    """The Adapters fields of these options."""
    return {"ip_adapter": options.pop("ip_adapter", None), "ip_image": options.pop("ip_image", None),
            "ip_scale": options.pop("ip_scale", 1.0), "ip_image_encoder": options.pop("ip_image_encoder", None)}


def encoder_folder(adapters) -> Path:
    return Path(adapters.ip_image_encoder or Path(adapters.ip_adapter).parent / "image_encoder")


def check(adapters) -> None:
    """Before loading: the files are there, the image is an image."""
    if adapters.ip_adapter is None:
        if adapters.ip_image is not None:
            raise UsageError("--ip-image needs --ip-adapter FILE: add the IP-Adapter, or drop --ip-image")
        return
    if not Path(adapters.ip_adapter).is_file():
        raise UsageError(f"--ip-adapter {adapters.ip_adapter}: no such file: give the path of an IP-Adapter file")
    if adapters.ip_image is None:
        raise UsageError("--ip-adapter needs --ip-image IMG: the image that steers the run")
    if not (encoder_folder(adapters) / "config.json").is_file():
        raise UsageError(f"the IP-Adapter's image encoder is not at {encoder_folder(adapters)}: put the "
                         "image_encoder folder beside the IP-Adapter file, or give --ip-image-encoder DIR")
    open_image(adapters.ip_image)


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UsageError(f"--ip-image {path}: not a readable image ({error}): give a PNG, JPEG or WebP") from None


def load(pipe, adapters, errors: tuple) -> None:
    """The image encoder, then the IP-Adapter's projection and attention weights, at --ip-scale."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from sdrun.ops.processor import reinstall

    path = Path(adapters.ip_adapter)
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_folder(adapters), dtype=pipe.unet.dtype)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the image encoder at {encoder_folder(adapters)} ({error}): give the CLIP "
                         "image encoder folder of this IP-Adapter with --ip-image-encoder DIR") from None
    side = encoder.config.image_size  # 224 for the real encoders; the processor's defaults assume it
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    try:
        pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    except errors as error:
        raise ModelError(f"{path} is not an IP-Adapter for this {pipe.sdrun_family} model and its image encoder "
                         f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}): "
                         "give an IP-Adapter trained for this model's family") from None
    pipe.set_ip_adapter_scale(adapters.ip_scale)
    reinstall(pipe)  # diffusers replaced the processors: if the kernel was installed, sdrun's come back


def image_embeds(pipe, adapters, count: int, guidance: bool, device) -> list:
    """The UNet's `image_embeds`: unconditional half first under guidance, like the text conditioning."""
    import torch

    with torch.no_grad():
        return pipe.prepare_ip_adapter_image_embeds(open_image(adapters.ip_image), None, device, count, guidance)
