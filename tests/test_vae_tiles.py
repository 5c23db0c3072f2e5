"""Tiled VAE decode and encode with shared GroupNorm statistics (render/shared_norm_tiles.py) against the untiled VAE
and diffusers' own tiling, and bench/tiled_vae.py's plumbing.

The VAE is the tiny test model with random weights, conditioned as bench/tiled_vae.py does (residual branches
scaled down, so that it responds to its input as smoothly as a trained VAE rather than chaotically); the input is
1/f noise (smooth regions with detail on top, so tiles differ in content the way parts of a picture do). Its decoded
pixels have a standard deviation of 0.28, its encoded parameters 0.26."""

import sys
from pathlib import Path

import pytest
import torch

from sdrun import models
from sdrun.render import shared_norm_tiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tiled_vae as bench  # noqa: E402

TILE, OVERLAP = 64, 16  # image pixels: 32 and 8 latent pixels of the tiny VAE (scale factor 2)
LATENT_SIZE = (48, 64)  # 2 x 3 tiles
BLOCK = TILE // 2 // 4  # the colour metric's block, a quarter tile, in latent pixels


@pytest.fixture(scope="module")
def vae():
    return bench.condition(models.build_tiny().vae).eval()


def compare(vae, encode: bool) -> dict:
    """name -> quality against the untiled result, for diffusers' tiling and sdrun's."""
    if encode:
        inputs = bench.pink_noise((1, 3, LATENT_SIZE[0] * 2, LATENT_SIZE[1] * 2)).clamp(-1, 1)
    else:
        inputs = bench.pink_noise((1, 4, *LATENT_SIZE)) * 2
    functions = bench.tilers(vae, TILE, OVERLAP, encode)
    per_latent = 1 if encode else 2
    with torch.no_grad():
        reference = functions["untiled"](inputs)
        return {name: bench.quality(functions[name](inputs), reference,
                                    bench.bands(name, LATENT_SIZE, TILE, OVERLAP, per_latent, 2), BLOCK * per_latent)
                for name in ("diffusers", "sdrun")}


def test_tiled_decode_is_close_to_untiled_and_keeps_the_colours_diffusers_tiles_shift(vae):
    found = compare(vae, encode=False)
    sdrun, diffusers = found["sdrun"], found["diffusers"]
    # measured: sdrun max 0.078, mean 0.012, spread 0.051; diffusers 0.33, 0.041, 0.20
    assert sdrun["max"] < 0.15 and sdrun["mean"] < 0.02
    assert sdrun["spread"] < diffusers["spread"] / 2 and sdrun["colour"] < diffusers["colour"] / 2
    assert sdrun["seam"] < diffusers["seam"] / 2


def test_tiled_encode_is_close_to_untiled_and_closer_than_diffusers(vae):
    found = compare(vae, encode=True)
    sdrun, diffusers = found["sdrun"], found["diffusers"]
    # measured: sdrun max 0.10, mean 0.017, colour 0.065; diffusers 0.21, 0.025, 0.11
    assert sdrun["max"] < 0.15 and sdrun["mean"] < 0.025
    assert sdrun["colour"] < diffusers["colour"] * 0.75 and sdrun["spread"] < diffusers["spread"]


def test_an_image_within_one_tile_is_decoded_and_encoded_whole(vae):
    latents = bench.pink_noise((2, 4, 24, 32))
    calls = []
    hook = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            tiled = shared_norm_tiles.decode(vae, latents, TILE, OVERLAP)
            untiled = vae.decode(latents).sample
    finally:
        hook.remove()
    assert len(calls) == 2 + 1  # one call per image, no statistics pass; then the untiled one
    assert (tiled - untiled).abs().max() < 1e-5
    pixels = bench.pink_noise((1, 3, 48, 64)).clamp(-1, 1)
    with torch.no_grad():
        encoded = shared_norm_tiles.encode(vae, pixels, TILE, OVERLAP)
        assert (encoded - vae.encode(pixels).latent_dist.parameters).abs().max() < 1e-5


def test_each_image_of_a_batch_has_its_own_statistics(vae):
    latents = torch.cat([bench.pink_noise((1, 4, *LATENT_SIZE), seed) * 2 for seed in (1, 2)])
    latents[1] += 3  # a much brighter second image: its statistics must not darken the first
    with torch.no_grad():
        together = shared_norm_tiles.decode(vae, latents, TILE, OVERLAP)
        alone = shared_norm_tiles.decode(vae, latents[:1], TILE, OVERLAP)
    assert together.shape == (2, 3, LATENT_SIZE[0] * 2, LATENT_SIZE[1] * 2)
    assert (together[:1] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("length, tile, overlap", [(48, 32, 8), (64, 32, 8), (100, 32, 0), (100, 64, 31), (33, 32, 4)])
def test_tiles_cover_the_axis_and_their_weights_sum_to_one(length, tile, overlap):
    axis = shared_norm_tiles._Axis(length, tile, overlap)
    spans = axis.spans()
    assert spans[0].start == 0 and spans[-1].stop == length and axis.size <= tile
    assert all(after.start <= before.stop - overlap for before, after in zip(spans, spans[1:]))
    for per_unit in (1, 8):
        total = torch.zeros(length * per_unit)
        for index, span in enumerate(spans):
            weights = axis.weights(index, per_unit, "cpu")
            total[span.start * per_unit:span.stop * per_unit] += weights
            if index > 0 and overlap:  # a tile's zero-padded edge next to a neighbour hardly counts
                assert weights[0] < 0.05
        assert torch.allclose(total, torch.ones_like(total))


def test_overlap_zero_decodes_and_the_tiles_share_statistics(vae):
    latents = bench.pink_noise((1, 4, *LATENT_SIZE)) * 2
    with torch.no_grad():
        out = shared_norm_tiles.decode(vae, latents, TILE, 0)
        reference = vae.decode(latents).sample
    assert out.shape == reference.shape and (out - reference).abs().mean() < 0.03


def test_bench_runs_every_row_at_a_small_size():
    tables = bench.main(["--family", "tiny", "--sizes", "128x96", "--encode-size", "128x96", "--tile", str(TILE),
                         "--overlap", str(OVERLAP)])
    assert [title for title, _ in tables] == ["decode 128x96", "encode 128x96"]
    for _, rows in tables:
        assert [row["name"] for row in rows] == ["untiled", "diffusers", "sdrun"]
        assert all(row["seconds"] > 0 for row in rows)
        assert rows[2]["spread"] < rows[1]["spread"]
