"""Model sources: the tiny pipeline, diffusers folders, single checkpoint files, the Hub, and every bad input.

Nothing here may touch the network: an autouse fixture makes every socket connection fail, so a loader that
tried to reach the Hub would fail these tests rather than pass by luck of a cache.
"""

import json
import os
import runpy
import socket
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                  convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_layout import (clip_to_original, open_clip_to_original, pipeline_to_original, save_config_folder,
                       tiny_model_folder, tiny_sdxl, unet_to_original, vae_to_original)  # noqa: F401 (fixture)
from sdrun.errors import ModelError
from sdrun.model_source import CONFIGS, detect_family, resolve_model
from sdrun.models import build_tiny, load_pipeline, tokenizer

# Published parameter counts: UNet, VAE, text encoder(s).
PARAMETERS = {
    "sd1": (859_520_964, 83_653_863, [123_060_480]),
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sd2-v": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, so setting the variable in a fixture is not enough.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def meta_models(family: str) -> tuple:
    """The family's UNet, VAE and text encoders at full size on the meta device: shapes, no memory."""
    folder = CONFIGS / family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    return unet, vae, encoders


# --- tokenizer and configs -------------------------------------------------------------------------------------


def test_tokenizer_matches_the_published_clip_ids():
    assert tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer()) == 49408 and tokenizer().pad_token_id == 49407
    assert tokenizer("!").pad_token_id == 0  # OpenCLIP-trained encoders pad with "!"


def test_tokenizer_files_are_derived_from_the_clip_bpe_file(tmp_path):
    bpe = Path("/tmp/bpe.txt.gz")
    if not bpe.is_file():
        pytest.skip("OpenAI's bpe_simple_vocab_16e6.txt.gz is not at /tmp/bpe.txt.gz")
    runpy.run_path(str(CONFIGS / "tokenizer" / "derive.py"))["derive"](bpe, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (CONFIGS / "tokenizer" / name).read_bytes()


@pytest.mark.parametrize("family", sorted(PARAMETERS))
def test_configs_have_the_published_parameter_counts(family):
    unet, vae, encoders = meta_models(family)
    expected_unet, expected_vae, expected_encoders = PARAMETERS[family]
    assert sum(p.numel() for p in unet.parameters()) == expected_unet
    assert sum(p.numel() for p in vae.parameters()) == expected_vae
    assert [sum(p.numel() for p in e.parameters()) for e in encoders] == expected_encoders


# --- family detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "expected"), [
    ("sd1", "sd1"),
    ("sd2", "sd2"),
    ("sd2-v", "sd2"),  # epsilon or v: the shapes cannot tell, a test step of the UNet does (tests below)
    ("sdxl", "sdxl"),
])
def test_detect_family_at_real_size(family, expected):
    unet, _, encoders = meta_models(family)
    shapes = unet_to_original(unet.state_dict(), unet.config)
    if family == "sdxl":
        shapes.update(open_clip_to_original(encoders[1].state_dict(), "conditioner.embedders.1.model."))
    assert detect_family(shapes) == expected


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_conversion_inverts_the_test_converter_at_real_size(family):
    """Every real-size key maps back to itself with its shape, through diffusers' own single-file converters."""
    unet, vae, encoders = meta_models(family)
    cases = [(unet, convert_ldm_unet_checkpoint(unet_to_original(unet.state_dict(), unet.config), unet.config)),
             (vae, convert_ldm_vae_checkpoint(vae_to_original(vae.state_dict(), vae.config), vae.config))]
    if family == "sd2":
        prefix = "cond_stage_model.model."
        cases.append((encoders[0], convert_open_clip_checkpoint(
            encoders[0], open_clip_to_original(encoders[0].state_dict(), prefix), prefix)))
    else:
        prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
        cases.append((encoders[0], convert_ldm_clip_checkpoint(clip_to_original(encoders[0].state_dict(), prefix))))
    if family == "sdxl":
        prefix = "conditioner.embedders.1.model."
        cases.append((encoders[1], convert_open_clip_checkpoint(
            encoders[1], open_clip_to_original(encoders[1].state_dict(), prefix), prefix)))
    for model, converted in cases:
        converted = {key.removeprefix("text_model.") if not hasattr(model, "text_model") else key: value
                     for key, value in converted.items()}
        expected = {key: value.shape for key, value in model.state_dict().items()}
        assert {key: value.shape for key, value in converted.items()} == expected, type(model).__name__


def test_detect_family_refuses_files_without_a_unet():
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        detect_family({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)})


# --- loading ---------------------------------------------------------------------------------------------------


def test_tiny_is_fast_deterministic_and_64px():
    build_tiny()  # the first build also pays for lazy imports
    start = time.perf_counter()
    pipe = load_pipeline(resolve_model("tiny"))
    assert time.perf_counter() - start < 1.0
    assert pipe.sdrun_family == "tiny" and pipe.safety_checker is None
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    again = build_tiny()
    assert all(same_weights(getattr(pipe, c), getattr(again, c)) for c in ("unet", "vae", "text_encoder"))
    assert pipe.unet.conv_in.weight.flatten()[:3].tolist() == pytest.approx([-0.00125, 0.08941, -0.13717], abs=1e-5)


def test_tiny_in_half_precision():
    assert load_pipeline(resolve_model("tiny"), torch.float16).unet.dtype == torch.float16


def test_diffusers_folder(tiny_model_folder):
    source = resolve_model(str(tiny_model_folder))
    assert source.kind == "folder" and source.path == tiny_model_folder
    pipe = load_pipeline(source)
    assert pipe.sdrun_family == "sd1" and pipe.safety_checker is None
    assert same_weights(pipe.unet, build_tiny().unet)


@pytest.mark.parametrize(("suffix", "open_clip"), [(".safetensors", False), (".ckpt", False), (".safetensors", True)])
def test_single_file_round_trip_is_exact(tmp_path, suffix, open_clip):
    """SD 1.x layout, and SD 2.x's OpenCLIP text encoder layout (same toy weights, other key names)."""
    source = build_tiny()
    state = pipeline_to_original(source, open_clip=open_clip)
    if not open_clip:  # real SD 1.x files carry this buffer; the loader must accept it
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 1}, path)  # the nesting CompVis checkpoints use
    else:
        save_file(state, path)
    pipe = load_pipeline(resolve_model(str(path), config_dir=str(CONFIGS / "tiny")))
    assert pipe.sdrun_family == "sd1" and pipe.safety_checker is None
    for component in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(pipe, component), getattr(source, component)), component


@pytest.mark.parametrize("text_model_level", [True, False])
def test_sdxl_single_file_round_trip_is_exact(tmp_path, text_model_level):
    """Also with the first text encoder's keys as diffusers' conversion script writes them under transformers 5."""
    source = tiny_sdxl()
    state = pipeline_to_original(source)
    if not text_model_level:
        prefix = "conditioner.embedders.0.transformer."
        state = {key.replace(prefix + "text_model.", prefix): value for key, value in state.items()}
    save_file(state, tmp_path / "xl.safetensors")
    config = save_config_folder(source, tmp_path / "xl-config")
    pipe = load_pipeline(resolve_model(str(tmp_path / "xl.safetensors"), config_dir=str(config)))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.sdrun_family == "sdxl"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(pipe, component), getattr(source, component)), component
    assert pipe.tokenizer_2.pad_token == "!"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SDRUN_REAL_SIZE_TESTS"), reason="set SDRUN_REAL_SIZE_TESTS=1 (2-7 GB files)")
@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_real_size_single_file_loads_with_bundled_configs(tmp_path, family):
    """Random fp16 weights at full size, written in the original layout: detection, configs/ and the loader agree."""
    torch.manual_seed(0)
    with torch.device("meta"):
        torch.set_default_dtype(torch.float16)
        try:
            unet, vae, encoders = meta_models(family)
        finally:
            torch.set_default_dtype(torch.float32)
    models = [unet.to_empty(device="cpu"), vae.to_empty(device="cpu")] + [e.to_empty(device="cpu") for e in encoders]
    with torch.no_grad():
        for parameter in (p for model in models for p in model.parameters()):
            parameter.normal_(0, 0.02)
        if family == "sd2-v":  # random weights answer the epsilon-or-v test step like neither: answer as v does
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.fill_(-1.0)
    state = unet_to_original(unet.state_dict(), unet.config) | vae_to_original(vae.state_dict(), vae.config)
    if family == "sdxl":
        state |= clip_to_original(encoders[0].state_dict(), "conditioner.embedders.0.transformer.")
        state |= open_clip_to_original(encoders[1].state_dict(), "conditioner.embedders.1.model.")
    elif family == "sd2-v":
        state |= open_clip_to_original(encoders[0].state_dict(), "cond_stage_model.model.")
    else:
        state |= clip_to_original(encoders[0].state_dict(), "cond_stage_model.transformer.")
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "model.safetensors")
    del state
    pipe = load_pipeline(resolve_model(str(tmp_path / "model.safetensors")), torch.float16)
    assert pipe.sdrun_family == family
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    for name, model in zip(names, models):
        assert same_weights(getattr(pipe, name), model), name


def test_config_names_a_bundled_family(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert resolve_model(str(tmp_path / "m.safetensors"), config_dir="sd2").config_dir == CONFIGS / "sd2"


# --- SD 2.x: epsilon or v, judged from the weights ---------------------------------------------------------------


@pytest.fixture
def tiny_sd2(tmp_path, monkeypatch):
    """A toy pipeline whose UNet cross-attends 1024 wide (so its file reads as SD 2.x), and bundled configs whose
    sd2 and sd2-v folders fit it, as the real ones fit real files. Its text encoder is 32 wide: it loads, but
    could not generate."""
    pipe = build_tiny()
    config = dict(pipe.unet.config) | dict(cross_attention_dim=1024, use_linear_projection=True)
    pipe.unet = UNet2DConditionModel.from_config(config)
    configs = tmp_path / "configs"
    (configs / "tokenizer").parent.mkdir()
    (configs / "tokenizer").symlink_to(CONFIGS / "tokenizer")
    for family, prediction, sample_size, upcast in (("sd2", "epsilon", 32, False), ("sd2-v", "v_prediction", 48, True)):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
        pipe.unet.register_to_config(sample_size=sample_size, upcast_attention=upcast)
        pipe.vae.register_to_config(sample_size=sample_size * 2)
        save_config_folder(pipe, configs / family)
    monkeypatch.setattr("sdrun.model_source.CONFIGS", configs)  # planning reads it there, loading here
    monkeypatch.setattr("sdrun.models.CONFIGS", configs)
    return pipe


def sd2_file(pipe, folder: Path, output: float) -> Path:
    """`pipe` as an SD 2.x single file whose UNet outputs `output` everywhere, whatever its input."""
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.fill_(output)
    save_file(pipeline_to_original(pipe, open_clip=True), folder / "sd2.safetensors")
    return folder / "sd2.safetensors"


# The test step feeds a latent of 0.5 at t=999: an epsilon model answers about the input (the noise it sees),
# a v model about minus the image it imagines behind it, well below -0.5.
@pytest.mark.parametrize(("output", "family", "prediction", "sample_size"), [
    (0.5, "sd2", "epsilon", 32),
    (-1.0, "sd2-v", "v_prediction", 48),
])
def test_sd2_prediction_is_judged_by_a_test_step_of_the_unet(tmp_path, tiny_sd2, output, family, prediction,
                                                            sample_size):
    notes = []
    pipe = load_pipeline(resolve_model(str(sd2_file(tiny_sd2, tmp_path, output))), note=notes.append)
    assert pipe.sdrun_family == family and pipe.scheduler.config.prediction_type == prediction
    assert pipe.unet.config.sample_size == sample_size  # the family's native size
    assert pipe.vae.config.sample_size == sample_size * 2  # the other parts come from the family's config
    upcast = family == "sd2-v"
    assert {m.upcast_attention for m in pipe.unet.modules() if isinstance(m, Attention)} == {upcast}
    assert same_weights(pipe.unet, tiny_sd2.unet)
    kind, other = ("v-prediction", "sd2") if upcast else ("epsilon", "sd2-v")
    assert len(notes) == 1 and f"an SD 2.x {kind}" in notes[0] and f"--config {other}" in notes[0]


@pytest.mark.parametrize("config", ["sd2", "sd2-v"])
def test_config_overrides_the_sd2_test_step(tmp_path, tiny_sd2, config):
    notes = []
    source = resolve_model(str(sd2_file(tiny_sd2, tmp_path, -1.0)), config_dir=config)
    pipe = load_pipeline(source, note=notes.append)
    assert pipe.sdrun_family == config and notes == []


# --- errors: one line naming the problem and the fix -----------------------------------------------------------


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and ": " in text
    return text


@pytest.mark.parametrize("spec", ["./no/such/model.safetensors", "sd15.ckpt", "models/sd15"])
def test_missing_path(tmp_path, spec):
    (tmp_path / "models").mkdir()  # so models/sd15 reads as a path with a typo, not a Hub id
    with pytest.raises(ModelError, match="does not exist") as excinfo:
        resolve_model(spec)
    message(excinfo)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json") as excinfo:
        resolve_model(str(tmp_path))
    message(excinfo)


def test_unknown_extension(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown extension") as excinfo:
        resolve_model(str(tmp_path / "model.bin"))
    message(excinfo)


def test_config_folder_without_model_index(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match="--config folder .* has no model_index.json") as excinfo:
        resolve_model(str(tmp_path / "m.safetensors"), config_dir=str(tmp_path))
    message(excinfo)


def test_text_file_named_safetensors(tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a checkpoint\n")
    with pytest.raises(ModelError, match="corrupt or truncated") as excinfo:
        load_pipeline(resolve_model(str(tmp_path / "notes.safetensors")))
    message(excinfo)


def test_truncated_safetensors(tmp_path):
    save_file(pipeline_to_original(build_tiny()), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated") as excinfo:
        load_pipeline(resolve_model(str(tmp_path / "cut.safetensors")))
    message(excinfo)


def test_safetensors_without_unet_weights(tmp_path):
    save_file({"weight": torch.zeros(3)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint") as excinfo:
        load_pipeline(resolve_model(str(tmp_path / "lora.safetensors")))
    message(excinfo)


class Payload:
    """Stands for the code a malicious pickle would run; weights-only loading must refuse to import it."""


def test_ckpt_that_needs_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelError, match="needs pickled code to load.*convert it to .safetensors") as excinfo:
        load_pipeline(resolve_model(str(tmp_path / "evil.ckpt")))
    message(excinfo)


def test_file_that_does_not_match_its_detected_config(tmp_path):
    save_file(pipeline_to_original(build_tiny()), tmp_path / "tiny.safetensors")  # detected sd1, but toy-sized
    with pytest.raises(ModelError, match="pass --config") as excinfo:
        load_pipeline(resolve_model(str(tmp_path / "tiny.safetensors")))
    message(excinfo)


def test_hub_id_offline():
    source = resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert source.kind == "hub" and source.path is None
    with pytest.raises(ModelError, match="could not fetch 'stable-diffusion-v1-5/stable-diffusion-v1-5' from the "
                                         "Hugging Face Hub") as excinfo:
        load_pipeline(source)
    assert "--model PATH" in message(excinfo) and "--model tiny" in message(excinfo)


def test_config_only_applies_to_files():
    with pytest.raises(ModelError, match="--config applies only to a single checkpoint file"):
        resolve_model("tiny", config_dir="sd1")


def test_model_index_names_a_real_pipeline():
    for family in ("sd1", "sd2", "sd2-v", "sdxl", "tiny"):
        index = json.loads((CONFIGS / family / "model_index.json").read_text())
        assert index["_class_name"] in ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def test_a_folder_read_in_the_background_loads_the_same_weights(tiny_model_folder):
    from sdrun import checkpoint
    from sdrun.model_source import weights_files

    source = resolve_model(str(tiny_model_folder))
    files = weights_files(tiny_model_folder)
    assert sorted(path.parent.name for path in files) == ["text_encoder", "unet", "vae"]
    reads = checkpoint.BackgroundReads(files, torch.float16)
    read_first = load_pipeline(source, torch.float16, reads=reads)
    plain = load_pipeline(source, torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(read_first, name).state_dict(), getattr(plain, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[key], theirs[key]) for key in mine)
        assert all(value.dtype == torch.float16 for value in mine.values() if value.is_floating_point())


def test_a_damaged_weights_file_read_in_the_background_is_a_model_error(tiny_model_folder):
    from sdrun import checkpoint
    from sdrun.model_source import weights_files

    unet = tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    reads = checkpoint.BackgroundReads(weights_files(tiny_model_folder), torch.float32)
    with pytest.raises(ModelError, match="could not load the diffusers folder"):
        load_pipeline(resolve_model(str(tiny_model_folder)), reads=reads)


def test_background_reads_let_go_of_a_dropped_file_and_read_an_unlisted_one(tiny_model_folder):
    from sdrun import checkpoint
    from sdrun.model_source import weights_files

    text_encoder, unet, vae = sorted(weights_files(tiny_model_folder), key=lambda path: path.parent.name)
    reads = checkpoint.BackgroundReads([unet, vae], torch.float16)
    reads.drop(vae)
    assert vae not in reads._reads and unet in reads._reads
    state = reads.take(text_encoder)  # never listed: read there and then
    assert state and all(value.dtype == torch.float16 for value in state.values() if value.is_floating_point())
    assert set(reads.take(unet)) == set(UNet2DConditionModel.from_pretrained(tiny_model_folder / "unet").state_dict())
