"""Find and load the model behind `--model`: 'tiny', a Hub id, a diffusers folder, or one checkpoint file.

Single checkpoint files (the original Stable Diffusion layout, as CompVis/Stability/A1111 publish them) load with
no network at all: the family is read from the file's keys and shapes, and diffusers' `from_single_file` gets the
matching config folder from `configs/` plus the CLIP tokenizer from `configs/tokenizer`, so it never asks the Hub.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

# sdrun reports loading itself; library warnings and tqdm bars would bury its one-line errors. Set before the
# diffusers import, which already warns (about torchvision) while importing its pipelines.
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from sdrun.errors import ModelError  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

# A wheel installs configs/ as sdrun/configs (setup.py); a source checkout or editable install has it beside sdrun/.
CONFIGS = next(d for d in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent / "configs")
               if d.is_dir())
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
HUB_ID = re.compile(r"^[\w][\w.-]*/[\w][\w.-]*$")
UNET_PREFIX = "model.diffusion_model."
# The global_step stored in Stability's SD 2.0-base checkpoint, the one epsilon-trained SD 2 model that diffusers
# tells apart from the v-prediction ones (single_file_utils._legacy_load_scheduler).
SD2_EPSILON_GLOBAL_STEP = 875000


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "tiny" | "hub" | "folder" | "file"
    spec: str  # what the user passed
    path: Path | None  # folder or file, for local kinds
    config_dir: Path | None  # --config override, a diffusers config folder


def resolve_model(spec: str, config_dir: str | None = None) -> ModelSource:
    """Validate without loading anything heavy: 'tiny'; an existing folder with model_index.json; an existing
    .safetensors/.ckpt/.pt/.pth file; else a Hub id 'org/name'. Raises ModelError with one line naming problem+fix.

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
    return path


def load_pipeline(source: ModelSource, torch_dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Return a StableDiffusionPipeline or StableDiffusionXLPipeline on the CPU, safety checker off, with
    `pipe.sdrun_family` set to one of "tiny", "sd1", "sd2", "sd2-v", "sdxl". Errors become ModelError."""
    if source.kind == "tiny":
        pipe, family = build_tiny(torch_dtype), "tiny"
    elif source.kind == "file":
        pipe, family = _load_file(source, torch_dtype)
    else:
        pipe = _load_pretrained(source, torch_dtype)
        family = _family_of_pipeline(pipe)
    pipe.sdrun_family = family
    return pipe


def build_tiny(torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The SD 1.x-shaped toy pipeline from configs/tiny, with weights drawn after manual_seed(0): same on every run."""
    folder = CONFIGS / "tiny"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=torch_dtype)


def tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer every family shares; OpenCLIP-trained encoders (SD 2.x, SDXL's second) pad with '!'."""
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(CONFIGS / "tokenizer", model_max_length=77, **extra)


def _load_pretrained(source: ModelSource, torch_dtype: torch.dtype) -> DiffusionPipeline:
    where = str(source.path) if source.kind == "folder" else source.spec
    # Extra kwargs a pipeline does not take (safety_checker for SDXL) are ignored by diffusers.
    kwargs = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False,
                  local_files_only=source.kind == "folder")
    try:
        pipe = DiffusionPipeline.from_pretrained(where, **kwargs)
    except OSError as error:
        if source.kind == "hub":
            raise ModelError(f"could not fetch '{source.spec}' from the Hugging Face Hub (no network or no such "
                             "model): download it elsewhere and pass its folder or .safetensors file with "
                             "--model PATH") from error
        raise ModelError(f"could not load the diffusers folder '{source.spec}' ({_first_line(error)}): "
                         "check that the folder is complete, or save it again with save_pretrained") from error
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ModelError(f"'{source.spec}' is a {type(pipe).__name__}, not a Stable Diffusion text-to-image "
                         "model: pass an SD 1.x, SD 2.x or SDXL model")
    return pipe


def file_family(source: ModelSource) -> str:
    """The family of a single checkpoint file, read from its keys and shapes (or its --config folder)."""
    if source.config_dir is not None:
        return _family_of_config(source.config_dir)
    shapes, global_step = read_checkpoint_shapes(source.path)
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise _not_a_checkpoint(source.path)
    return detect_family(shapes, global_step)


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
    return _family_of_config(folder)


def _family_of_pipeline(pipe: DiffusionPipeline) -> str:
    return _family(isinstance(pipe, StableDiffusionXLPipeline), pipe.unet.config.cross_attention_dim,
                   pipe.scheduler.config.get("prediction_type"))


def _family_of_config(folder: Path) -> str:
    def read(name: str) -> dict:  # a part missing here makes from_single_file fail with its own message
        return json.loads((folder / name).read_text()) if (folder / name).is_file() else {}

    return _family(read("model_index.json").get("_class_name") == "StableDiffusionXLPipeline",
                   read("unet/config.json").get("cross_attention_dim"),
                   read("scheduler/scheduler_config.json").get("prediction_type"))


def _family(is_xl: bool, cross_attention_dim: int, prediction_type: str | None) -> str:
    if is_xl:
        return "sdxl"
    if cross_attention_dim == 1024:  # OpenCLIP ViT-H states: SD 2.x
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd1"


def _load_file(source: ModelSource, torch_dtype: torch.dtype) -> tuple[DiffusionPipeline, str]:
    shapes, global_step = read_checkpoint_shapes(source.path)
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise _not_a_checkpoint(source.path)
    family = detect_family(shapes, global_step)
    config = source.config_dir or CONFIGS / family
    if source.config_dir is not None:
        family = _family_of_config(config)  # the user's config knows v-prediction from epsilon; the weights do not
    if family == "sdxl":
        cls, components = StableDiffusionXLPipeline, dict(tokenizer=tokenizer(), tokenizer_2=tokenizer("!"))
    else:
        pad = "!" if family.startswith("sd2") else None
        cls, components = StableDiffusionPipeline, dict(tokenizer=tokenizer(pad), safety_checker=None)
    try:
        pipe = cls.from_single_file(str(source.path), config=str(config), local_files_only=True,
                                    dtype=torch_dtype, **components)
    except SingleFileComponentError as error:
        raise ModelError(f"'{source.spec}' lacks weights the pipeline needs ({_first_line(error)}): use a full "
                         "checkpoint that includes the VAE and text encoder") from error
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise ModelError(f"could not build a pipeline from '{source.spec}' with the config '{config}' "
                         f"({_first_line(error)}): pass --config with the diffusers config folder that "
                         "matches this checkpoint") from error
    return pipe, family


def read_checkpoint_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """Key -> shape of every tensor in a checkpoint, plus its training global_step if it stored one.
    Reads .safetensors headers only; .ckpt files are memory-mapped and unpickled weights-only, never executed."""
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, None
        except (SafetensorError, OSError) as error:
            raise _unreadable(path) from error
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 pickle format cannot mmap
    # Unpickling garbage fails in many ways (KeyError, EOFError, UnpicklingError, ...): all mean a bad file,
    # except torch's weights-only refusal to import a class or function the pickle names ("Unsupported global").
    except Exception as error:
        if "Unsupported global" in str(error):
            raise ModelError(f"'{path}' needs pickled code to load; sdrun loads .ckpt weights-only for safety: "
                             "convert it to .safetensors") from error
        raise _unreadable(path) from error
    if not isinstance(data, dict):
        raise _not_a_checkpoint(path)
    global_step = data.get("global_step")
    while isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    shapes = {key: tuple(value.shape) for key, value in data.items() if isinstance(value, torch.Tensor)}
    return shapes, global_step if isinstance(global_step, int) else None


def detect_family(shapes, global_step: int | None = None) -> str:
    """Tell sd1 / sd2 / sd2-v / sdxl from an original-layout checkpoint's keys and shapes (key -> shape or tensor).

    SDXL carries a second text encoder under conditioner.embedders.1. SD 2.x cross-attends to 1024-wide OpenCLIP
    states, SD 1.x to 768 (any other width is SD 1.x-shaped too, like the tiny test models). Weights cannot tell
    v-prediction from epsilon, so this follows diffusers: SD 2 is v-prediction (the 768 models) unless the file's
    global_step is 875000, Stability's 512 epsilon base; `--config sd2` fixes a wrong guess.
    """
    shapes = {key: tuple(getattr(value, "shape", value)) for key, value in shapes.items()}
    context_dims = {shape[-1] for key, shape in shapes.items()
                    if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")}
    if not context_dims:
        raise _not_a_checkpoint(None)
    in_channels = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelError(f"this checkpoint's UNet takes {in_channels} input channels (an inpainting or other "
                         "special model), not 4: pass a text-to-image SD 1.x, SD 2.x or SDXL checkpoint")
    if any(key.startswith("conditioner.embedders.1.") for key in shapes):
        return "sdxl"
    if context_dims == {1024}:
        return "sd2" if global_step == SD2_EPSILON_GLOBAL_STEP else "sd2-v"
    return "sd1"


def _unreadable(path: Path) -> ModelError:
    # The library's reason (in the chained traceback, SDRUN_DEBUG=1) is often a paragraph or a bare byte value.
    return ModelError(f"'{path}' is corrupt or truncated, or not a checkpoint: download the checkpoint again")


def _not_a_checkpoint(path: Path | None) -> ModelError:
    what = f"'{path}'" if path else "this file"
    return ModelError(f"{what} is not a Stable Diffusion checkpoint (no UNet weights under "
                      f"'{UNET_PREFIX}'): pass an SD 1.x, SD 2.x or SDXL checkpoint in the original layout")


def _first_line(error: Exception) -> str:
    """The first sentence of a library error: the rest is advice for library users, not for sdrun's."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")
    return " ".join(line.split())  # diffusers leaves double spaces where a name is empty
