"""A LoRA file checked before any weights load, from its .safetensors header alone (tensor names and shapes; the
safetensors library reads the header, at most 100 MB, and no tensor): it holds LoRA weights, and they fit the model.

A LoRA changes the cross-attention projections to_k and to_v, whose input is the text encoder's states: their
"down" matrices (kohya's lora_down, PEFT's lora_A) are (rank, width of the text states), 768 for SD 1.x, 1024 for
SD 2.x and 2048 for SDXL. A LoRA of another width, or one with weights for SDXL's second text encoder given to a
model that has none, is for another family. Pickled LoRAs (.pt, .ckpt) have no header: diffusers' loading checks them.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdrun.errors import ModelError, UsageError

# kohya: ..._attn2_to_k.lora_down.weight; PEFT: ...attn2.to_k.lora_A.weight; old diffusers: ...attn2.processor.to_k_lora.down.weight
CROSS_ATTENTION_DOWN = re.compile(r"attn2[._](?:processor[._])?to_[kv](?:[._]lora)?[._](?:lora_)?(?:down|A)\.weight$")
SECOND_TEXT_ENCODER = ("lora_te2_", "text_encoder_2.")  # kohya's and diffusers' names for SDXL's second encoder
FAMILY_OF_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd2-v": "SD 2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Target:
    """What a LoRA must fit: the model's family and the width of the text states its UNet cross-attends to."""

    family: str  # sdrun's name: sd1, sd2, sd2-v, sdxl, tiny
    cross_attention_dim: int

    @property
    def name(self) -> str:
        return FAMILY_NAMES.get(self.family, self.family)


def target(family: str, configs: Path) -> Target | None:
    """The Target of a model whose configs are in the diffusers folder `configs`; None if they do not say."""
    try:
        width = json.loads((configs / "unet" / "config.json").read_text()).get("cross_attention_dim")
    except (OSError, ValueError):
        return None
    return Target(family, width) if isinstance(width, int) else None


def check(path: Path, model: Target | None) -> None:
    """Before loading anything: a .safetensors LoRA must hold LoRA tensors (its header says so), made for `model`
    (None: the model is not known before it loads)."""
    if path.suffix.lower() != ".safetensors":
        return  # a pickle is checked when it loads (weights only: adapters._read)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as file:
            shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"{path} is not a readable .safetensors file ({error}): download it again") from None
    if not any("lora" in key or key.endswith(".alpha") for key in shapes):
        raise ModelError(f"{path} holds no LoRA weights (no lora_up/lora_down or lora_A/lora_B tensors): "
                         "give a LoRA file, or pass a checkpoint with --model")
    if model is not None:
        _check_family(path, shapes, model)


def _check_family(path: Path, shapes: dict, model: Target) -> None:
    widths = {shape[-1] for key, shape in shapes.items() if CROSS_ATTENTION_DOWN.search(key) and len(shape) == 2}
    fix = f"give a LoRA trained for {model.name} models, or a model of the LoRA's family with --model"
    if widths and model.cross_attention_dim not in widths:
        width = max(widths)
        made_for = FAMILY_OF_WIDTH.get(width, "another model family")
        raise UsageError(f"the LoRA {path} is for {made_for} (its cross-attention reads {width}-wide text states), "
                         f"but this model is {model.name} ({model.cross_attention_dim}-wide): {fix}")
    if model.family != "sdxl" and any(key.startswith(SECOND_TEXT_ENCODER) for key in shapes):
        raise UsageError(f"the LoRA {path} is for SDXL (it changes a second text encoder), but this model is "
                         f"{model.name}, with one text encoder: {fix}")
