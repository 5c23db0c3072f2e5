"""`--vae FILE`: a separate VAE in place of the model's own (SDXL's fp16-fix VAE, SD 1.x's ft-MSE VAE, ...).

FILE is a single .safetensors/.ckpt/.pt/.pth (the original layout, bare or under `first_stage_model.`/`vae.`, or
diffusers' own key names) or a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors). It is read
through sdrun/checkpoint.py: bounded, tensor by tensor, no pickled code. A single file has no config: it takes the
model's VAE config, with `force_upcast` off, so that it decodes in fp16 first and is redone in fp32 only if that
overflows (the decode stage's rule); a folder keeps its own config (the fp16-fix VAE's says force_upcast false).
"""

from pathlib import Path

import accelerate
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from sdrun import checkpoint
from sdrun.errors import ModelError
from sdrun.model_source import VAE_FIX, VAE_WEIGHTS, read_json
from sdrun.models import LOAD_ERRORS

# Where a VAE's tensors sit in a file: inside a whole checkpoint, or bare (a VAE saved on its own).
PREFIXES = ("first_stage_model.", "vae.", "encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def replace_vae(pipe, path: Path, dtype: torch.dtype) -> None:
    """Put the VAE at `path` in place of `pipe`'s, after checking that it fits the model's latents."""
    vae = _from_folder(path, dtype) if path.is_dir() else _from_file(path, pipe.vae.config, dtype)
    own, given = pipe.vae.config, vae.config
    if (given.latent_channels, len(given.block_out_channels)) != (own.latent_channels, len(own.block_out_channels)):
        raise ModelError(f"--vae '{path}' is a VAE of another architecture ({given.latent_channels} latent channels, "
                         f"{2 ** (len(given.block_out_channels) - 1)}x downscaling; this model's: "
                         f"{own.latent_channels}, {2 ** (len(own.block_out_channels) - 1)}x): pass a VAE made for "
                         "this model's family")
    pipe.register_modules(vae=vae.eval())


def _from_folder(path: Path, dtype: torch.dtype) -> AutoencoderKL:
    config = read_json(path / "config.json", VAE_FIX)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelError(f"--vae folder '{path}' holds a {config['_class_name']}, not an AutoencoderKL: {VAE_FIX}")
    return _filled(config, _read(path / VAE_WEIGHTS, dtype, ("",)), path, dtype, "its config.json")


def _from_file(path: Path, model_config, dtype: torch.dtype) -> AutoencoderKL:
    state = _read(path, dtype, PREFIXES)
    if not state:
        raise ModelError(f"--vae '{path}' holds no VAE weights (no encoder/decoder tensors): {VAE_FIX}")
    config = dict(model_config)
    with accelerate.init_empty_weights():
        expected = AutoencoderKL.from_config(config).state_dict().keys()
    if not set(expected) <= set(state):  # not diffusers' key names: the original layout
        try:
            state = convert_ldm_vae_checkpoint(state, config)
        except LOAD_ERRORS as error:
            raise ModelError(f"--vae '{path}' is not a VAE in the original layout nor in diffusers' ({error!r}): "
                             f"{VAE_FIX}") from error
    vae = _filled(config, state, path, dtype, "this model's VAE")
    vae.register_to_config(force_upcast=False)  # the model's config speaks for the model's own VAE only
    return vae


def _read(path: Path, dtype: torch.dtype, prefixes: tuple[str, ...]) -> dict:
    try:
        return checkpoint.read_state_dict(path, dtype, prefixes)
    except ModelError as error:  # the reader's words name the file, not the option it came from
        raise ModelError(f"--vae: {error}") from error


def _filled(config: dict, state: dict, path: Path, dtype: torch.dtype, against: str) -> AutoencoderKL:
    """An AutoencoderKL of `config` (`against` names where it came from) holding `state`; a missing or misshapen
    tensor is a one-line error."""
    try:
        with accelerate.init_empty_weights():
            vae = AutoencoderKL.from_config(config)
    except LOAD_ERRORS as error:
        raise ModelError(f"--vae '{path}' has a config diffusers cannot build ({error}): {VAE_FIX}") from error
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    misshapen = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or misshapen:
        key = (missing or misshapen)[0]
        found = f"lacks '{key}'" if missing else (f"has '{key}' in the shape {list(state[key].shape)}, "
                                                  f"where {against} asks for {list(expected[key].shape)}")
        raise ModelError(f"--vae '{path}' does not fit {against}: it {found} (a VAE of another "
                         "architecture, or a damaged file): pass a VAE made for this model's family")
    vae.load_state_dict({key: state[key] for key in expected}, assign=True)
    return vae.to(dtype)
