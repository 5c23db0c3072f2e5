"""--vae FILE (issue 10): a separate VAE, as an original-layout file (.safetensors, .ckpt) or a diffusers folder,
replaces the model's; it is recorded and replayed; a bad or mismatched one is a one-line error before any image."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, meta, pixels
from sd_layout import vae_to_original
from sdrun import models


@pytest.fixture(scope="module")
def changed_vae():
    """The tiny model's VAE with every weight nudged: a different VAE of the same architecture."""
    vae = models.build_tiny().vae
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return vae


@pytest.fixture
def vae_files(changed_vae, isolated):
    """The changed VAE written three ways, as users find VAEs: a bare original-layout .safetensors (what
    vae-ft-mse-840000 and sdxl_vae ship), a whole-checkpoint-style .ckpt (under first_stage_model.), a folder."""
    original = vae_to_original(changed_vae.state_dict(), changed_vae.config)
    bare = {key.removeprefix("first_stage_model."): value.contiguous() for key, value in original.items()}
    save_file(bare, "vae.safetensors")
    torch.save({"state_dict": original}, "vae.ckpt")
    changed_vae.save_pretrained("vae-folder")
    return ("vae.safetensors", "vae.ckpt", "vae-folder")


def test_a_separate_vae_replaces_the_models_and_is_recorded_and_replayed(sdrun, vae_files):
    assert sdrun("a red fox", *TINY, "--seed", "2", "-o", "plain.png").exit_code == 0
    for index, vae in enumerate(vae_files):
        result = sdrun("a red fox", *TINY, "--seed", "2", "--vae", vae, "-o", f"{index}.png")
        assert result.exit_code == 0, result
        assert meta(f"{index}.png")["vae"] == vae
    assert np.abs(pixels("0.png") - pixels("plain.png")).mean() > 0.05  # the VAE changed the image
    assert all(np.array_equal(pixels("0.png"), pixels(f"{index}.png")) for index in (1, 2))  # one VAE, three files
    assert sdrun("replay", "0.png", "-o", "again.png").exit_code == 0
    assert np.array_equal(pixels("again.png"), pixels("0.png"))


def write_garbage(path):
    path.write_bytes(b"not a checkpoint at all" * 40)


def write_wide_vae(path):
    """A VAE of another architecture: 16 latent channels (as SD 3's), in the original layout."""
    from diffusers import AutoencoderKL

    config = dict(models.build_tiny().vae.config, latent_channels=16)
    vae = AutoencoderKL.from_config(config)
    save_file({k: v.contiguous() for k, v in vae_to_original(vae.state_dict(), vae.config).items()}, path)


def write_unet_only(path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)


@pytest.mark.parametrize(("name", "write", "message"), [
    ("broken.safetensors", write_garbage, "--vae: 'broken.safetensors' is corrupt or truncated"),
    ("wide.safetensors", write_wide_vae,
     "does not fit this model's VAE: it has 'encoder.conv_out.weight' in the shape [32, 64, 3, 3]"),
    ("unet.safetensors", write_unet_only, "holds no VAE weights"),
    ("missing.safetensors", None, "--vae 'missing.safetensors' does not exist"),
    ("vae.txt", lambda path: path.write_text("x"), "unknown extension '.txt'"),
])
def test_a_bad_vae_is_one_line_before_any_image(sdrun, isolated, name, write, message):
    if write is not None:
        write(isolated / name)
    result = sdrun("a red fox", *TINY, "--vae", name)
    assert result.exit_code == 1, result
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (isolated / "outputs").exists()


def test_a_vae_folder_of_another_architecture_is_refused(sdrun, isolated):
    from diffusers import AutoencoderKL

    AutoencoderKL.from_config(dict(models.build_tiny().vae.config, latent_channels=16)).save_pretrained("wide")
    result = sdrun("a red fox", *TINY, "--vae", "wide")
    assert result.exit_code == 1 and "another architecture (16 latent channels" in result.stderr, result
    incomplete = isolated / "incomplete"
    incomplete.mkdir()
    result = sdrun("a red fox", *TINY, "--vae", "incomplete")
    assert result.exit_code == 1 and "has no config.json or diffusion_pytorch_model.safetensors" in result.stderr
