"""What `--model`, `--config` and `--vae` name, checked and described from configs and file headers alone: the
model's source, family and geometry. No weights are read and no diffusers class is imported (sdrun/models.py loads),
so `sdrun plan`, `--dry-run` and the errors they find come before diffusers' import (seconds).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sdrun import checkpoint
from sdrun.errors import ModelError

# A wheel installs configs/ as sdrun/configs (setup.py); a source checkout or editable install has it beside sdrun/.
CONFIGS = next(d for d in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent / "configs")
               if d.is_dir())
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
# The pipeline classes a model_index.json may name, and whether each is SDXL's.
PIPELINES = {"StableDiffusionPipeline": False, "StableDiffusionXLPipeline": True}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
HUB_ID = re.compile(r"^[\w][\w.-]*/[\w][\w.-]*$")
UNET_PREFIX = "model.diffusion_model."
JSON_LIMIT = 16 << 20  # CLIP's tokenizer.json, the largest config file a model folder holds, is 2 MB
# The file save_pretrained writes for one component's weights (unsharded), by the library of the component.
WEIGHTS_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
FOLDER_FIX = "check that the folder is complete, or save it again with save_pretrained"
CONFIG_FIX = f"fix it, or pass --config with one of {', '.join(FAMILIES)}"
VAE_WEIGHTS = WEIGHTS_FILES["diffusers"]
VAE_FIX = "pass a VAE .safetensors/.ckpt file or a diffusers VAE folder (config.json and " + VAE_WEIGHTS + ")"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "tiny" | "hub" | "folder" | "file"
    spec: str  # what the user passed
    path: Path | None  # folder or file, for local kinds
    config_dir: Path | None  # --config override, a diffusers config folder


def resolve_model(spec: str, config_dir: str | None = None) -> ModelSource:
    """Validate without loading anything heavy: 'tiny'; an existing folder with a model_index.json naming a Stable
    Diffusion pipeline, and config files that parse; an existing .safetensors/.ckpt/.pt/.pth file; else a Hub id
    'org/name'. Raises ModelError with one line naming problem+fix.

    `config_dir` may also name a bundled config (sd1, sd2, sd2-v, sdxl), since users cannot easily find configs/.
    """
    config = _resolve_config_dir(config_dir) if config_dir is not None else None
    path = Path(spec).expanduser()
    if spec == "tiny":
        kind, path = "tiny", None
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"folder '{spec}' is not a diffusers model (no model_index.json): "
                             "pass a folder saved with save_pretrained, or a .safetensors/.ckpt file")
        _check_folder(path, f"folder '{spec}'", FOLDER_FIX)
        kind = "folder"
    elif path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelError(f"'{spec}' has an unknown extension '{path.suffix}': "
                             "pass a .safetensors or .ckpt checkpoint, or a diffusers folder")
        kind = "file"
    elif HUB_ID.match(spec) and not spec.lower().endswith(CHECKPOINT_SUFFIXES) and not path.parent.is_dir():
        kind, path = "hub", None  # 'org/name' whose 'org' is no local folder: a path would have been a typo
    else:
        raise ModelError(f"model path '{spec}' does not exist: check the path, "
                         "or pass a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, or 'tiny'")
    if config is not None and kind != "file":
        raise ModelError("--config applies only to a single checkpoint file: drop --config, "
                         "or pass a .safetensors/.ckpt file with --model")
    return ModelSource(kind, spec, path, config)


def _resolve_config_dir(config_dir: str) -> Path:
    path = Path(config_dir).expanduser()
    if not path.exists() and config_dir in FAMILIES:
        path = CONFIGS / config_dir
    if not (path / "model_index.json").is_file():
        raise ModelError(f"--config folder '{config_dir}' has no model_index.json: pass a diffusers config folder "
                         f"or one of {', '.join(FAMILIES)}")
    _check_folder(path, f"--config folder '{config_dir}'", CONFIG_FIX)
    return path


def _check_folder(folder: Path, what: str, fix: str) -> None:
    """Parse every config file of a diffusers folder and check the pipeline class it names, so that a broken one
    is reported before anything loads (diffusers fails on them with tracebacks, or loops on none)."""
    for path in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        read_json(path, fix)
    pipeline_is_xl(read_json(folder / "model_index.json", fix), what)


def weights_files(folder: Path) -> list[Path]:
    """The weights file of each model (UNet, VAE, text encoders) that a diffusers folder holds unsharded, in its
    model_index.json's order: what models.py reads itself, the rest it leaves to diffusers."""
    index = read_json(folder / "model_index.json", FOLDER_FIX)
    files = [folder / name / WEIGHTS_FILES[entry[0]] for name, entry in index.items()
             if isinstance(entry, list) and len(entry) == 2 and entry[0] in WEIGHTS_FILES]
    return [path for path in files if path.is_file()]


def read_json(path: Path, fix: str) -> dict:
    """A config file's JSON object, or ModelError saying what is wrong with the file and `fix`."""
    try:
        if path.stat().st_size > JSON_LIMIT:
            problem = f"is {path.stat().st_size >> 20} MiB, far too large for a config file"
        else:
            data = json.loads(path.read_bytes())
            problem = None if isinstance(data, dict) else f"holds a JSON {type(data).__name__}, not an object"
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except RecursionError:
        problem = "nests too deeply to be a config file"
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    if problem:
        raise ModelError(f"'{path}' {problem}: {fix}")
    return data


def pipeline_is_xl(index: dict, what: str) -> bool:
    """Whether the Stable Diffusion text-to-image pipeline a model_index.json names is SDXL's; anything else is
    refused. By name: diffusers 0.42 has no other subclass of the two."""
    name = index.get("_class_name")
    if isinstance(name, str) and name in PIPELINES:
        return PIPELINES[name]
    named = f"'{name}'" if isinstance(name, str) else "no class"
    raise ModelError(f"the model_index.json of {what} names {named} as its pipeline, not a Stable Diffusion "
                     "text-to-image one: pass an SD 1.x, SD 2.x or SDXL model, or fix its _class_name")


def resolve_vae(spec: str | None) -> Path | None:
    """Check --vae before anything loads: an existing checkpoint file, or a folder with a config and weights."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        missing = [name for name in ("config.json", VAE_WEIGHTS) if not (path / name).is_file()]
        if missing:
            raise ModelError(f"--vae folder '{spec}' has no {' or '.join(missing)}: {VAE_FIX}")
        read_json(path / "config.json", VAE_FIX)
    elif not path.is_file():
        raise ModelError(f"--vae '{spec}' does not exist: check the path, or {VAE_FIX}")
    elif path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelError(f"--vae '{spec}' has an unknown extension '{path.suffix}': {VAE_FIX}")
    return path


def file_family(source: ModelSource) -> str:
    """The family of a single checkpoint file, read from its keys and shapes (or its --config folder)."""
    if source.config_dir is not None:
        return family_of_config(source.config_dir)
    if source.path.suffix.lower() == ".safetensors":  # the header's shapes are enough: no tensor is read
        try:
            with safe_open(source.path, framework="pt") as file:
                shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        except (SafetensorError, OSError):
            shapes = checkpoint.read_state_dict(source.path, None)  # raises the one-line error
    else:
        # as stored: a zip checkpoint is memory-mapped, so only its shapes are read here, not (cast) its tensors
        shapes = checkpoint.read_state_dict(source.path, None)
    return detect_family(shapes, source.path)


def geometry(folder: Path) -> tuple[int, int]:
    """(native image side, image pixels per latent pixel) from a diffusers folder's UNet and VAE configs."""
    def read(name: str) -> dict:
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}

    vae_scale = 2 ** (len(read("vae/config.json").get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = read("unet/config.json").get("sample_size", 64)
    return (sample if isinstance(sample, int) else sample[0]) * vae_scale, vae_scale


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder, from its JSON configs."""
    return family_of_config(folder)


def family_of_config(folder: Path) -> str:
    """The family a diffusers (config) folder describes: its pipeline class, its UNet's text width, its prediction."""
    def read(name: str) -> dict:  # a part missing here makes the loader fail with its own message
        return read_json(folder / name, CONFIG_FIX) if (folder / name).is_file() else {}

    is_xl = pipeline_is_xl(read("model_index.json"), f"--config folder '{folder}'")
    return family_from(is_xl, read("unet/config.json").get("cross_attention_dim"),
                       read("scheduler/scheduler_config.json").get("prediction_type"))


def family_from(is_xl: bool, cross_attention_dim: int, prediction_type: str | None) -> str:
    """"sdxl", "sd2-v", "sd2" or "sd1", from what a pipeline's configs say."""
    if is_xl:
        return "sdxl"
    if cross_attention_dim == 1024:  # OpenCLIP ViT-H states: SD 2.x
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd1"


def detect_family(shapes, path: Path | None = None) -> str:
    """Tell sd1 / sd2 / sdxl from an original-layout checkpoint's keys and shapes (key -> shape or tensor), read
    from `path` (named in errors).

    SDXL carries a second text encoder under conditioner.embedders.1. SD 2.x cross-attends to 1024-wide OpenCLIP
    states, SD 1.x to 768 (any other width is SD 1.x-shaped too, like the tiny test models). Whether an SD 2.x
    model predicts epsilon or v the shapes cannot tell: _predicts_v runs its UNet.
    """
    shapes = {key: tuple(getattr(value, "shape", value)) for key, value in shapes.items()}
    what = f"'{path}'" if path else "this checkpoint"
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    keys = [key for key in shapes if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")]
    for key, rank in [(conv_in, 4)] * (conv_in in shapes) + [(key, 2) for key in keys]:
        if len(shapes[key]) != rank:
            raise ModelError(f"{what} has the tensor '{key}' in the shape {list(shapes[key])}, where a "
                             f"{rank}-dimensional weight belongs: the file is damaged, download it again")
    if not keys:
        raise _not_a_checkpoint(path)
    in_channels = shapes.get(conv_in, (0, 4))[1]
    if in_channels != 4:
        raise ModelError(f"{what}'s UNet takes {in_channels} input channels (an inpainting or other "
                         "special model), not 4: pass a text-to-image SD 1.x, SD 2.x or SDXL checkpoint")
    if any(key.startswith("conditioner.embedders.1.") for key in shapes):
        return "sdxl"
    if {shapes[key][-1] for key in keys} == {1024}:
        return "sd2"
    return "sd1"


def _not_a_checkpoint(path: Path | None) -> ModelError:
    what = f"'{path}'" if path else "this file"
    return ModelError(f"{what} is not a Stable Diffusion checkpoint (no UNet weights under "
                      f"'{UNET_PREFIX}'): pass an SD 1.x, SD 2.x or SDXL checkpoint in the original layout")
