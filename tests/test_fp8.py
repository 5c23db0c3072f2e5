"""--fp8 and --fp8-text-encoders (issue 10): which weights are stored in fp8 and which stay in the compute dtype,
that layers compute in the compute dtype and go back to fp8, the image beside the plain one, the metadata, the
planner's weight figures, and the refusal where torch lacks the dtype."""

import numpy as np
import pytest
import torch

from conftest import TINY, meta, pixels
from sdrun import backends, models
from sdrun.config import Job, RunConfig
from sdrun.fp8_storage import KEPT, covered_layers, covered_share
from sdrun.render import memory
from sdrun.render import plan as render_plan
from test_models import meta_models

FP8 = torch.float8_e4m3fn
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@pytest.fixture(scope="module")
def stored():
    """The tiny pipeline with both fp8 backends applied, as a run applies them."""
    pipe = models.build_tiny()
    for name in ("fp8", "fp8_text_encoders"):
        backends.BY_NAME[name].apply(pipe, torch.device("cpu"))
    return pipe


def weight_dtypes(model, kinds) -> set:
    return {m.weight.dtype for m in model.modules() if isinstance(m, kinds) and m.weight is not None}


def test_covered_layers_store_their_weights_in_fp8_and_the_rest_stays_high(stored):
    unet, text = stored.unet, stored.text_encoder
    covered = {name for name, _ in covered_layers(unet, "unet")}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert module.weight.dtype == (FP8 if name in covered else torch.float32), name
            assert module.bias is None or module.bias.dtype == torch.float32, name
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= {n for n, _ in unet.named_modules()} - covered
    assert len(covered) > 50
    assert weight_dtypes(unet, NORMS) == weight_dtypes(text, NORMS) == {torch.float32}
    assert weight_dtypes(text, torch.nn.Linear) == {FP8}
    assert weight_dtypes(text, torch.nn.Embedding) == {torch.float32}
    assert {p.dtype for p in stored.vae.parameters()} == {torch.float32}  # the VAE is no part of --fp8
    assert stored.unet.dtype == torch.float32  # what the render stages make latents in


def test_a_stored_layer_computes_in_the_compute_dtype_and_keeps_its_fp8_weight(stored, monkeypatch):
    layer = next(m for _, m in covered_layers(stored.unet, "unet") if isinstance(m, torch.nn.Conv2d))
    seen, convolve = [], layer._conv_forward

    def recording(x, weight, bias):
        seen.append(weight.dtype)
        return convolve(x, weight, bias)

    monkeypatch.setattr(layer, "_conv_forward", recording)  # what the convolution itself is given
    x = torch.randn(1, layer.in_channels, 8, 8)
    stored_weight = layer.weight.detach().clone()
    with torch.no_grad():
        out = layer(x)
    assert seen == [torch.float32] and out.dtype == torch.float32
    assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8), stored_weight.view(torch.uint8))
    assert torch.equal(out, convolve(x, stored_weight.float(), layer.bias))  # the fp8-rounded weight, exact bias


def test_fp8_run_is_close_to_the_plain_one_and_recorded(sdrun):
    plain = sdrun("a red fox", *TINY, "--seed", "4", "-o", "plain.png")
    fp8 = sdrun("a red fox", *TINY, "--seed", "4", "--fp8", "--fp8-text-encoders", "-o", "fp8.png")
    assert plain.exit_code == 0 and fp8.exit_code == 0, fp8
    assert "float8_e4m3fn" in fp8.stderr and "computed in float32" in fp8.stderr
    difference = np.abs(pixels("fp8.png") - pixels("plain.png"))
    assert 0 < difference.mean() < 0.02 and difference.max() < 0.1  # measured: 0.004 mean, 0.03 max
    assert meta("fp8.png")["flags"] == ["fp8", "fp8_text_encoders"]


def test_fp8_where_torch_lacks_the_dtype_is_a_usage_error_naming_why(sdrun, monkeypatch, isolated):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    result = sdrun("a red fox", *TINY, "--fp8")
    assert result.exit_code == 2, result
    assert "float8_e4m3fn" in result.stderr and "torch 2.1 or later" in result.stderr
    assert not (isolated / "outputs").exists()


def test_info_shows_whether_fp8_is_usable(sdrun):
    result = sdrun("info", "--no-selftest")
    assert result.exit_code == 0
    assert any(line.split()[:2] == ["--fp8", "usable"] for line in result.stdout.splitlines()), result.stdout


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_planner_fp8_shares_are_the_real_architectures(family):
    unet, _, encoders = meta_models(family)
    assert covered_share(unet, "unet") == pytest.approx(memory.FP8_SHARES[family]["unet"], abs=1e-4)
    covered = sum(covered_share(e, "text") * sum(p.numel() for p in e.parameters()) for e in encoders)
    total = sum(p.numel() for e in encoders for p in e.parameters())
    assert covered / total == pytest.approx(memory.FP8_SHARES[family]["text"], abs=1e-4)


def test_the_planner_predicts_one_byte_per_stored_parameter():
    arch = memory.ARCHITECTURES["sdxl"]
    shares = memory.FP8_SHARES["sdxl"]
    fp16 = memory.Placement("resident", 2)
    fp8 = memory.Placement("resident", 2, {"unet": shares["unet"]})
    both = memory.Placement("resident", 2, shares)
    unet_saving = arch.unet * 1e6 * memory.FP8_SHARES["sdxl"]["unet"] / memory.GIB
    text_saving = arch.text * 1e6 * memory.FP8_SHARES["sdxl"]["text"] / memory.GIB
    assert memory.weights_gib(arch, fp16, "unet") - memory.weights_gib(arch, fp8, "unet") == pytest.approx(unet_saving)
    assert memory.weights_gib(arch, fp8, "unet") - memory.weights_gib(arch, both, "unet") == pytest.approx(text_saving)
    assert unet_saving == pytest.approx(2.38, abs=0.01)  # SDXL's UNet: 4.78 GiB in fp16, 2.40 with --fp8


def test_plan_with_fp8_predicts_smaller_weights_and_max_vram_picks_it_before_offload():
    info = render_plan.ModelInfo("sdxl", 1024, 8)
    job = Job(prompt="x")
    peaks = {flags: render_plan.make_plan(RunConfig(flags=flags), job, info, "cuda").stages[0].peak_gib
             for flags in (("fp16",), ("fp16", "fp8"))}
    assert peaks[("fp16",)] - peaks[("fp16", "fp8")] == pytest.approx(2.38, abs=0.01)  # encode_prompt: weights only
    fitted = render_plan.make_plan(RunConfig(max_vram=6), job, info, "cuda", budget=6)
    assert "fp8" in fitted.added and "model_offload" not in fitted.flags and fitted.peak_gib <= 6


def test_kept_layers_are_named_in_the_real_architectures():
    """A name in KEPT that matches nothing would silently store a precision-critical layer in fp8."""
    unet, _, encoders = meta_models("sdxl")
    names = {part for model in (unet, *encoders) for name, _ in model.named_modules() for part in name.split(".")}
    assert set(KEPT["unet"]) <= names and set(KEPT["text"]) <= names
