"""Reading the images a user gives (`--init-image`): checked before any work, in bounded time and memory."""

import contextlib
from pathlib import Path

from PIL import Image

from sdrun.errors import UsageError

MAX_PIXELS = 16384 * 16384  # PIL's decompression-bomb guard, at sdrun's largest size


def image_size(path: str) -> tuple[int, int]:
    """Width and height from the file's header."""
    with _reading(path):
        with Image.open(path) as image:
            return image.size


def open_image(path: str) -> Image.Image:
    """The whole image, as RGB."""
    with _reading(path):
        with Image.open(path) as image:
            return image.convert("RGB")


@contextlib.contextmanager
def _reading(path: str):
    """Turn every way a file can fail to be an image into one UsageError naming the file and the fix."""
    if not Path(path).is_file():
        raise UsageError(f"--init-image {path!r} does not exist: give the path of a PNG, JPEG or WebP image")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        yield
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UsageError(f"--init-image {path!r} is not an image sdrun can read ({type(error).__name__}): "
                         "give a PNG, JPEG or WebP image") from None
