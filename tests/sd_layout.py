"""Test helpers: write diffusers pipelines back out in the original Stable Diffusion single-file key layout, and
IP-Adapters in h94/IP-Adapter's (`write_ip_adapter`); the tiny UNet alone and its inputs (`tiny_unet`).

This is the inverse of diffusers' single-file conversion (diffusers/loaders/single_file_utils.py), kept as test
code so the loader can be checked on files we make ourselves, since no real weights may be downloaded. It covers
what SD 1.x, SD 2.x and SDXL base files hold: the UNet ("model.diffusion_model."), the VAE
("first_stage_model."), and the text encoders in OpenAI CLIP (transformers) or OpenCLIP layout.
"""

import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from sdrun.models import build_tiny, tokenizer

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_to_original(state_dict: dict, config) -> dict:
    """diffusers UNet2DConditionModel keys -> openaimodel keys under model.diffusion_model."""
    per_block = config["layers_per_block"] + 1  # down: resnets + downsampler; up: one more resnet, upsampler last
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    out = {}
    for key, value in state_dict.items():
        name, leaf = key.rsplit(".", 1)
        if name in UNET_FIXED:
            name = UNET_FIXED[name]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            block, part, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * per_block + layer + 1
            name = f"input_blocks.{index}.0.{_resnet(rest)}" if part == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
            name = f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
            part, layer, rest = m[1], int(m[2]), m[3]
            name = f"middle_block.{2 * layer}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            block, part, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * per_block + layer
            name = (f"output_blocks.{index}.0.{_resnet(rest)}" if part == "resnets"
                    else f"output_blocks.{index}.1.{rest}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
            block = int(m[1])
            slot = 2 if up_has_attention[block] else 1  # after the resnet, and after the attention if any
            name = f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv"
        else:
            raise KeyError(f"no original-layout name for UNet key {key}")
        out[f"model.diffusion_model.{name}.{leaf}"] = value
    return out


def _resnet(rest: str) -> str:
    return RESNET[rest]


def vae_to_original(state_dict: dict, config) -> dict:
    """diffusers AutoencoderKL keys -> ldm autoencoder keys under first_stage_model."""
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
        name = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", name)
        name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", name)
        name = re.sub(r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{num_up - 1 - int(m[1])}.block", name)
        name = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{num_up - 1 - int(m[1])}.upsample", name)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
            name = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[f"first_stage_model.{name}"] = value
    return out


def clip_to_original(state_dict: dict, prefix: str) -> dict:
    """transformers CLIPTextModel keys -> the same keys under `prefix` (OpenAI CLIP as SD 1.x and SDXL store it)."""
    return {prefix + ("" if key.startswith("text_model.") else "text_model.") + key: value
            for key, value in state_dict.items()}


def open_clip_to_original(state_dict: dict, prefix: str) -> dict:
    """transformers CLIP text keys -> OpenCLIP keys (SD 2.x, SDXL's second encoder): fused qkv, [width, proj] proj."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key in OPEN_CLIP:
            out[prefix + OPEN_CLIP[key]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    for (layer, leaf), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def pipeline_to_original(pipe, open_clip: bool = False) -> dict:
    """A whole SD/SDXL pipeline as one original-layout state dict. `open_clip`: SD 2.x text encoder layout."""
    out = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    if isinstance(pipe, StableDiffusionXLPipeline):
        out.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif open_clip:
        out.update(open_clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:
        out.update(clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return out


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """A toy SDXL pipeline (diffusers' test shapes). Its two text encoders must differ in width: diffusers picks
    the checkpoint's encoder for each by matching position-embedding widths."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=112,
        cross_attention_dim=96, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=64)
    text = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **text))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=64, intermediate_size=128, projection_dim=64, **text))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer(), tokenizer_2=tokenizer("!"), unet=unet,
                                     scheduler=scheduler)


def save_config_folder(pipe, folder: Path) -> Path:
    """Write `pipe` as a diffusers config folder with no weights, as a --config DIR for a single file."""
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    return folder


def tiny_folder(folder: Path) -> Path:
    """The tiny pipeline saved as a complete diffusers folder (weights included), for --model PATH tests."""
    build_tiny().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model_folder(tmp_path) -> Path:
    """Fixture: tmp_path/tiny-model, the tiny pipeline as a diffusers folder. Use with
    `from sd_layout import tiny_model_folder` in the test module (conftest.py belongs to the CLI tests)."""
    return tiny_folder(tmp_path / "tiny-model")


def write_ip_adapter(folder: Path, unet, tokens: int = 4) -> Path:
    """A random IP-Adapter in h94/IP-Adapter's layout for `unet`, with a tiny CLIP image encoder beside it in
    image_encoder/: image_proj.{proj,norm} and ip_adapter.{1,3,5,...}.to_{k,v}_ip, one pair per cross-attention."""
    torch.manual_seed(7)
    width = unet.config.cross_attention_dim
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24)).save_pretrained(folder / "image_encoder")
    tensors = {"image_proj.proj.weight": torch.randn(width * tokens, 24) * 0.3,
               "image_proj.proj.bias": torch.zeros(width * tokens),
               "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    cross = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for i, name in enumerate(cross):
        inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for kind in ("k", "v"):
            tensors[f"ip_adapter.{2 * i + 1}.to_{kind}_ip.weight"] = torch.randn(inner, width) * 0.3
    save_file(tensors, folder / "ip-adapter_tiny.safetensors")
    return folder / "ip-adapter_tiny.safetensors"


def tiny_unet(device="cpu", dtype=torch.float32):
    """The tiny config's UNet alone, seeded weights, in eval mode."""
    from sdrun import models

    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(models.CONFIGS / "tiny" / "unet")
    return UNet2DConditionModel.from_config(config).to(device, dtype).eval()


def tiny_unet_inputs(unet, device, dtype):
    """A batch of two 16x16 latents and their text states, seeded."""
    generator = torch.Generator("cpu").manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator).to(device, dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    return sample, context


def unet_against_float32(change, device="cuda", channels_last=False):
    """The tiny UNet in fp16 before and after `change(unet)`, and in float32: (changed, PyTorch's, float32) outputs,
    all float32, for tests that hold a rewiring's error to the size of PyTorch's own fp16 rounding. With
    `channels_last` the changed UNet's input is NHWC, as --channels-last hands it."""
    unet = tiny_unet(device, torch.float16)
    sample, context = tiny_unet_inputs(unet, device, torch.float16)
    with torch.no_grad():
        exact = tiny_unet(device, torch.float32)(sample.float(), 500, context.float()).sample
        pytorch = unet(sample, 500, context).sample.float()
        change(unet)
        if channels_last:
            sample = sample.to(memory_format=torch.channels_last)
        changed = unet(sample, 500, context).sample.float()
    return changed, pytorch, exact
