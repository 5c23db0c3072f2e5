"""Load the model behind `--model` (found and checked by sdrun/model_source.py): 'tiny', a Hub id, a diffusers
folder, or one checkpoint file.

Single checkpoint files (the original Stable Diffusion layout, as CompVis/Stability/A1111 publish them) load with
no network at all: the family is read from the file's keys and shapes, and diffusers' single-file converters get
the matching config folder from `configs/` plus the CLIP tokenizer from `configs/tokenizer`, so they never ask the
Hub. Whether an SD 2.x file predicts epsilon or v, one test step of its UNet tells (_predicts_v).

Weights are read tensor by tensor straight into the load dtype (sdrun/checkpoint.py), for files and for folders,
so loading peaks at about the size of the loaded weights in CPU RAM.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import transformers

# sdrun reports loading itself; library warnings and tqdm bars would bury its one-line errors. Set before the
# diffusers import, which already warns (about torchvision) while importing its pipelines.
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

import accelerate  # noqa: E402
import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    ModelMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file import load_single_file_sub_model  # noqa: E402
from diffusers.loaders.single_file_utils import SingleFileComponentError  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedModel  # noqa: E402

from sdrun import checkpoint  # noqa: E402
from sdrun.errors import ModelError  # noqa: E402
from sdrun.model_source import (  # noqa: E402
    CONFIG_FIX,
    CONFIGS,
    FOLDER_FIX,
    WEIGHTS_FILES,
    ModelSource,
    detect_family,
    family_from,
    family_of_config,
    pipeline_is_xl,
    read_json,
)

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

# What diffusers and transformers raise on checkpoints and configs that do not fit (a wrong shape, a missing key,
# a config value of the wrong type); sdrun words them as one line.
LOAD_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, OSError, SafetensorError)


def _pipeline_class(index: dict, what: str) -> type:
    """The diffusers class of the pipeline a model_index.json names (a Stable Diffusion one: pipeline_is_xl)."""
    pipeline_is_xl(index, what)
    return getattr(diffusers, index["_class_name"])


def _model_class(entry) -> type | None:
    """The class of a model_index.json entry ["library", "Class"] that holds weights (a diffusers or transformers
    model); None for the others (schedulers, tokenizers, empty entries, settings)."""
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in WEIGHTS_FILES):
        return None
    cls = _library_class(diffusers if entry[0] == "diffusers" else transformers, entry[1])
    return cls if cls is not None and issubclass(cls, (ModelMixin, PreTrainedModel)) else None


def _library_class(library, name) -> type | None:
    # diffusers and transformers import their classes lazily, so a name can also fail as an import
    try:
        cls = getattr(library, name) if isinstance(name, str) else None
    except (AttributeError, ImportError, RuntimeError):
        return None
    return cls if isinstance(cls, type) else None


def load_pipeline(source: ModelSource, torch_dtype: torch.dtype = torch.float32,
                  note: Callable[[str], None] = lambda message: None,
                  reads: checkpoint.BackgroundReads | None = None) -> DiffusionPipeline:
    """Return a StableDiffusionPipeline or StableDiffusionXLPipeline on the CPU, safety checker off, with
    `pipe.sdrun_family` set to one of "tiny", "sd1", "sd2", "sd2-v", "sdxl". Errors become ModelError.
    `note` receives what the user should know about a choice made while loading (SD 2.x epsilon or v).
    `reads`: a diffusers folder's weights files (model_source.weights_files), already being read in `torch_dtype`
    onto the device where the pipeline goes (its weights are then there, the rest moves with `pipe.to`); by
    default they are read into CPU memory from here."""
    if source.kind == "tiny":
        pipe, family = build_tiny(torch_dtype), "tiny"
    elif source.kind == "file":
        pipe, family = _load_file(source, torch_dtype, note)
    else:
        pipe = _load_pretrained(source, torch_dtype, reads)
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


def _load_pretrained(source: ModelSource, torch_dtype: torch.dtype,
                     reads: checkpoint.BackgroundReads | None) -> DiffusionPipeline:
    where = str(source.path) if source.kind == "folder" else source.spec
    # Extra kwargs a pipeline does not take (safety_checker for SDXL) are ignored by diffusers.
    kwargs = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False,
                  local_files_only=source.kind == "folder")
    try:
        if source.kind == "folder":
            kwargs |= _read_folder_models(source.path, torch_dtype, reads)
        pipe = DiffusionPipeline.from_pretrained(where, **kwargs)
    except torch.OutOfMemoryError:  # weights read onto the GPU: the CLI's out-of-memory advice, not a bad folder
        raise
    except LOAD_ERRORS as error:
        if source.kind == "hub":
            raise ModelError(f"could not fetch '{source.spec}' from the Hugging Face Hub (no network or no such "
                             "model): download it elsewhere and pass its folder or .safetensors file with "
                             "--model PATH, or try sdrun offline with --model tiny") from error
        raise ModelError(f"could not load the diffusers folder '{source.spec}' ({_first_line(error)}): "
                         f"{FOLDER_FIX}") from error
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ModelError(f"'{source.spec}' is a {type(pipe).__name__}, not a Stable Diffusion text-to-image "
                         "model: pass an SD 1.x, SD 2.x or SDXL model")
    return pipe


def _read_folder_models(folder: Path, torch_dtype: torch.dtype, reads: checkpoint.BackgroundReads | None) -> dict:
    """The folder's models (UNet, VAE, text encoders) built empty and filled tensor by tensor in `torch_dtype`:
    read here into CPU memory, or taken from `reads` where that read them.
    diffusers' own loading memory-maps each weights file and converts from the map, so the file's pages and the
    converted copy are resident at once (2.9x the loaded weights for an fp32 folder loaded in fp16). Components
    saved some other way (sharded, .bin, older key names that the libraries rename) are left to diffusers."""
    models = {}
    for name, entry in read_json(folder / "model_index.json", FOLDER_FIX).items():
        cls = _model_class(entry)
        weights = folder / name / WEIGHTS_FILES[entry[0]] if cls is not None else None
        if weights is None or not weights.is_file():
            continue
        with accelerate.init_empty_weights():  # parameters on the meta device, buffers real
            if issubclass(cls, ModelMixin):
                model = cls.from_config(cls.load_config(folder / name))
            else:
                model = cls(cls.config_class.from_pretrained(folder / name))
        with safe_open(weights, framework="pt") as file:
            if set(file.keys()) != set(model.state_dict()):
                if reads is not None:
                    reads.drop(weights)  # diffusers loads this one: the device must not hold it twice
                continue
        state = reads.take(weights) if reads is not None else checkpoint.read_safetensors(weights, torch_dtype)
        model.load_state_dict(state, assign=True)
        models[name] = model.to(torch_dtype).eval()  # the weights are in torch_dtype already; buffers may not be
    return models


def _family_of_pipeline(pipe: DiffusionPipeline) -> str:
    return family_from(isinstance(pipe, StableDiffusionXLPipeline), pipe.unet.config.cross_attention_dim,
                       pipe.scheduler.config.get("prediction_type"))


def _load_file(source: ModelSource, torch_dtype: torch.dtype,
               note: Callable[[str], None]) -> tuple[DiffusionPipeline, str]:
    state = checkpoint.read_state_dict(source.path, torch_dtype)
    family = detect_family(state, source.path)
    config = source.config_dir or CONFIGS / family
    if source.config_dir is not None:
        family = family_of_config(config)  # the user's config says epsilon or v

    def build(name: str, entry: list):
        return load_single_file_sub_model(
            library_name=entry[0], class_name=entry[1], name=name, checkpoint=state, pipelines=diffusers.pipelines,
            is_pipeline_module=False, cached_model_config_path=str(config), local_files_only=True,
            torch_dtype=torch_dtype)

    try:
        models = {"unet": build("unet", read_json(config / "model_index.json", CONFIG_FIX)["unet"])}
        if family == "sd2" and source.config_dir is None:  # the UNet's answer picks the config for the rest
            family = _judge_sd2(models["unet"], source.path.name, note)
            config = CONFIGS / family
        index = read_json(config / "model_index.json", CONFIG_FIX)
        models |= {name: build(name, entry) for name, entry in index.items()
                   if name != "unet" and _model_class(entry) is not None}
        if family == "sdxl":
            models |= dict(tokenizer=tokenizer(), tokenizer_2=tokenizer("!"))
        else:
            models |= dict(tokenizer=tokenizer("!" if family.startswith("sd2") else None), safety_checker=None)
        pipe = _pipeline_class(index, f"--config folder '{config}'").from_pretrained(
            str(config), **models, requires_safety_checker=False, local_files_only=True)
    except SingleFileComponentError as error:
        raise ModelError(f"'{source.spec}' lacks weights the pipeline needs ({_first_line(error)}): use a full "
                         "checkpoint that includes the VAE and text encoder") from error
    except LOAD_ERRORS as error:
        raise ModelError(f"could not build a pipeline from '{source.spec}' with the config '{config}' "
                         f"({_first_line(error)}): pass --config with the diffusers config folder that "
                         "matches this checkpoint, or download it again if it is damaged") from error
    return pipe, family


def _judge_sd2(unet: UNet2DConditionModel, name: str, note: Callable[[str], None]) -> str:
    """"sd2" or "sd2-v" for a UNet built from the sd2 config; it gets the sd2-v UNet settings if it predicts v."""
    family = "sd2-v" if _predicts_v(unet) else "sd2"
    _adopt_unet_config(unet, CONFIGS / family)
    kind, other = ("v-prediction (768 px)", "sd2") if family == "sd2-v" else ("epsilon (512 px)", "sd2-v")
    note(f"{name}: an SD 2.x {kind} model, judged by one test step of its UNet; "
         f"pass --config {other} if its images come out wrong")
    return family


def _predicts_v(unet: UNet2DConditionModel) -> bool:
    """Whether an SD 2.x UNet predicts v rather than epsilon, by A1111's test (is_using_v_parameterization_for_sd2):
    one step at t=999 on a constant latent of 0.5, with a constant context of 0.5.

    At t=999 a latent is all but pure noise (alpha-bar 0.005). An epsilon model predicts that noise, about its
    input (output - input between 0 and -0.5, as it may read the input's mean as image). A v model predicts
    sqrt(alpha-bar) * noise - sqrt(1 - alpha-bar) * image, about minus the image it imagines behind the input, a
    positive one to explain that mean: A1111 finds output - input below -1 for v models, and uses -1 as the line."""
    config = unet.config
    sample = torch.full((1, config.in_channels, 8, 8), 0.5, dtype=unet.dtype)
    context = torch.full((1, 2, config.cross_attention_dim), 0.5, dtype=unet.dtype)
    with torch.no_grad():
        prediction = unet(sample, 999, encoder_hidden_states=context, return_dict=False)[0]
    return (prediction.float() - sample.float()).mean().item() < -1


def _adopt_unet_config(unet: UNet2DConditionModel, folder: Path) -> None:
    """Give a UNet built from one SD 2.x config the other's settings: the sd2 and sd2-v UNets differ only in
    sample_size (the native size: 512 or 768 px) and upcast_attention, which the attention modules keep."""
    wanted = UNet2DConditionModel.load_config(folder / "unet")
    unet.register_to_config(sample_size=wanted["sample_size"], upcast_attention=wanted["upcast_attention"])
    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = wanted["upcast_attention"]


def _first_line(error: Exception) -> str:
    """The first sentence of a library error: the rest is advice for library users, not for sdrun's."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")
    return " ".join(line.split())  # diffusers leaves double spaces where a name is empty
