"""Tiled VAE decode (and encode) side by side: untiled, diffusers' tiling, sdrun's (render/shared_norm_tiles.py).

The VAE is a full-size architecture (configs/sd1 by default) with seeded random weights, conditioned (`condition`)
to behave less chaotically than a random network does. The input has structure at every scale (1/f noise: smooth regions with detail on top, so tiles differ in content the way
parts of a picture do). Columns, each against the untiled result:
- seconds (after a warm-up at a small size; on the CPU the process's CPU seconds, steadier on a shared machine) and
  peak GiB (GPU: max_memory_allocated during the call);
- max and mean absolute error;
- colour: the largest per-channel mean error over any block of a quarter tile (a colour shift in one part);
- spread: the largest minus the smallest such block mean (tiles shifted against each other: the visible kind);
- seam: mean absolute error inside the tiler's own overlap bands (where tiles meet).

    python bench/tiled_vae.py                    # GPU, fp16: 3840x2160 and 2048x2048 decodes, then an encode
    python bench/tiled_vae.py --sizes 512x512 --tile 256 --overlap 32 --fp32     # CPU
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from sdrun import models  # noqa: E402
from sdrun.render import shared_norm_tiles  # noqa: E402

BRANCH_SCALE = 0.2
GIB = 2 ** 30


def build_vae(family: str, dtype: torch.dtype, device: str) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(models.CONFIGS / family / "vae"))
    return condition(vae).to(device, dtype).eval()


def condition(vae: AutoencoderKL) -> AutoencoderKL:
    """Scale the last layer of every residual branch (ResnetBlock2D.conv2, the attention's output) by BRANCH_SCALE:
    each block then adds a small change to what it is given, as in a trained network, instead of a random one
    (with every weight at its random init, 1% off in one GroupNorm's statistics moved the output by half its
    standard deviation)."""
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.mul_(BRANCH_SCALE)
            elif isinstance(module, Attention):
                module.to_out[0].weight.mul_(BRANCH_SCALE)
    return vae


def pink_noise(shape, seed: int = 1) -> torch.Tensor:
    """Noise with equal energy per octave, unit standard deviation."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape)
    size = 1
    while size <= max(shape[-2:]):
        coarse = torch.randn(*shape[:2], size, size, generator=generator)
        out += F.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=False)
        size *= 2
    return (out - out.mean()) / out.std()


@contextlib.contextmanager
def diffusers_tiles(vae, size: int, overlap: int):
    """diffusers' own tiling at `size` image pixels sharing `overlap` (what sdrun used before)."""
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor
    vae.tile_sample_min_size, vae.tile_latent_min_size = size, size // shared_norm_tiles.scale_factor(vae)
    vae.tile_overlap_factor = overlap / size
    try:
        yield
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


def tilers(vae, tile: int, overlap: int, encode: bool) -> dict:
    """name -> (function of the input, the overlap bands in output pixels: a list of (axis, start, stop))."""
    if encode:
        def diffusers(x):
            with diffusers_tiles(vae, tile, overlap):
                return vae.tiled_encode(x).latent_dist.parameters
        return {"untiled": lambda x: vae.encode(x).latent_dist.parameters, "diffusers": diffusers,
                "sdrun": lambda x: shared_norm_tiles.encode(vae, x, tile, overlap)}

    def diffusers(x):
        with diffusers_tiles(vae, tile, overlap):
            return vae.tiled_decode(x, return_dict=False)[0]
    return {"untiled": lambda x: vae.decode(x, return_dict=False)[0], "diffusers": diffusers,
            "sdrun": lambda x: shared_norm_tiles.decode(vae, x, tile, overlap)}


def bands(name: str, size, tile: int, overlap: int, per_latent: int, factor: int) -> list[tuple[int, int, int]]:
    """Where each tiler's tiles overlap, in output pixels along each axis: (axis, start, stop)."""
    found = []
    for axis, length in enumerate(size):  # length in latent pixels
        if name == "diffusers":  # tiles every (1 - overlap/tile) of a tile, each blending its first `overlap`
            stride, blend = (tile - overlap) // factor, overlap // factor
            pairs = [(start, start + blend) for start in range(stride, length, stride)]
        else:
            spans = shared_norm_tiles._Axis(length, tile // factor, overlap // factor).spans()
            pairs = [(after.start, before.stop) for before, after in zip(spans, spans[1:])]
        found += [(axis, start * per_latent, stop * per_latent) for start, stop in pairs]
    return found


def quality(out: torch.Tensor, reference: torch.Tensor, seams, block: int) -> dict:
    error = out.float() - reference.float()
    means = F.avg_pool2d(error, block, stride=block)  # (B, C, blocks): the colour error of each block
    band = torch.zeros(error.shape[-2:], dtype=torch.bool, device=error.device)
    for axis, start, stop in seams:
        if axis == 0:
            band[start:stop] = True
        else:
            band[:, start:stop] = True
    return {"max": error.abs().max().item(), "mean": error.abs().mean().item(),
            "colour": means.abs().max().item(),
            "spread": (means.amax((-1, -2)) - means.amin((-1, -2))).max().item(),
            "seam": error.abs()[..., band].mean().item() if band.any() else float("nan")}


def measure(function, x: torch.Tensor, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter if device == "cuda" else time.process_time  # CPU: the process's CPU seconds
    start = clock()
    with torch.no_grad():
        out = function(x)
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")
    return out, clock() - start, peak


def run(vae, width: int, height: int, tile: int, overlap: int, encode: bool, device: str) -> list[dict]:
    factor = shared_norm_tiles.scale_factor(vae)
    latent_size = (height // factor, width // factor)
    if encode:
        x = pink_noise((1, 3, height, width)).clamp(-1, 1)
    else:
        x = pink_noise((1, vae.config.latent_channels, *latent_size)) * 2  # latents / scaling factor: std about 5
    x = x.to(device, vae.dtype)
    functions = tilers(vae, tile, overlap, encode)
    reference, seconds, peak = measure(functions["untiled"], x, device)
    rows = [dict(name="untiled", seconds=seconds, peak=peak)]
    per_latent = 1 if encode else factor
    block = max(2, tile // (1 if not encode else factor) // 4)
    for name in ("diffusers", "sdrun"):
        out, seconds, peak = measure(functions[name], x, device)
        seams = bands(name, latent_size, tile, overlap, per_latent, factor)
        rows.append(dict(name=name, seconds=seconds, peak=peak, **quality(out, reference, seams, block)))
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'':10} {'seconds':>8} {'peak GiB':>9} {'max':>8} {'mean':>8} {'colour':>8} {'spread':>8} {'seam':>8}")
    for row in rows:
        cells = "".join(f" {row[key]:8.4f}" if key in row else f" {'':8}"
                        for key in ("max", "mean", "colour", "spread", "seam"))
        print(f"{row['name']:10} {row['seconds']:8.3f} {row['peak']:9.2f}{cells}")


def main(argv=None) -> list[tuple[str, list[dict]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=("tiny", "sd1", "sdxl"))
    parser.add_argument("--sizes", default="3840x2160,2048x2048", help="decode sizes, WxH, comma-separated")
    parser.add_argument("--encode-size", default="2048x2048", help="WxH of the encode measured after; none: skip")
    parser.add_argument("--tile", type=int, default=512, help="image pixels")
    parser.add_argument("--overlap", type=int, default=64, help="image pixels")
    parser.add_argument("--fp32", action="store_true", help="float32 (default on the GPU: fp16)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.fp32 or device == "cpu" else torch.float16
    vae = build_vae(args.family, dtype, device)
    print(f"{args.family} VAE, random weights, residual branches x{BRANCH_SCALE}, {dtype}, {device}, tile {args.tile} overlap "
          f"{args.overlap}; 1/f-noise input")
    warm = args.tile + args.tile // 2
    run(vae, warm, warm, args.tile, args.overlap, False, device)  # warm-up: kernels chosen, allocator grown
    tables = []
    jobs = [(size, False) for size in args.sizes.split(",")]
    if args.encode_size != "none":
        jobs.append((args.encode_size, True))
    for size, encode in jobs:
        width, height = map(int, size.split("x"))
        rows = run(vae, width, height, args.tile, args.overlap, encode, device)
        title = f"{'encode' if encode else 'decode'} {width}x{height}"
        print_rows(title, rows)
        tables.append((title, rows))
    return tables


if __name__ == "__main__":
    main()
