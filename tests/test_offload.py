"""Weights streamed from CPU memory: --cpu-offload (every model) and --max-vram's partial residency (the UNet parts
that do not fit). On the CPU the weights' home and the device are the same memory, so these tests check what
does not depend on a GPU: the planner's choice, which blocks stream for a budget, and that the group-offloading
hooks leave the image unchanged on sdrun's own render path."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdrun import models, offload, pipeline
from sdrun.backends import cpu_offload
from sdrun.backends.base import Backend
from sdrun.config import Job, RunConfig
from sdrun.console import Reporter
from sdrun.render import plan as render_plan
from sdrun.render.stages import render

from conftest import TINY

SD1 = render_plan.ModelInfo("sd1", 512, 8)


def sd1_plan(max_vram: float, flags=("fp16",)) -> render_plan.RenderPlan:
    return render_plan.make_plan(RunConfig(max_vram=max_vram, flags=flags), Job(prompt="x"), SD1, "cuda",
                                 budget=max_vram)


def test_partial_residency_comes_between_fitting_whole_and_offloading_the_model():
    whole, partial, offloaded = sd1_plan(2.2), sd1_plan(1.6), sd1_plan(0.9)
    assert whole.unet_resident_gib is None and "partial" not in whole.added and "fp8" in whole.added
    assert "partial" in partial.added and not {"model_offload", "cpu_offload"} & set(partial.flags)
    assert 0 < partial.unet_resident_gib
    assert partial.peak_gib <= 1.6 * render_plan.HEADROOM
    assert partial.record()["unet_resident_gib"] == partial.unet_resident_gib
    assert offloaded.unet_resident_gib is None and {"model_offload", "cpu_offload"} & set(offloaded.flags)
    # the less room, the less of the UNet stays
    assert sd1_plan(1.4).unet_resident_gib < partial.unet_resident_gib


def test_plan_command_says_partial_residency_and_the_run_loads_it(sdrun):
    result = sdrun("plan", "a cat", "--model", str(models.CONFIGS / "sd1"),
                   "--device", "cuda", "--fp16", "--max-vram", "1.6")
    assert result.exit_code == 0, result
    assert "the rest streamed from CPU memory" in result.stderr and "GiB resident" in result.stderr
    assert "UNet partly resident" in result.stdout
    planned = pipeline.plan_run(RunConfig(model=str(models.CONFIGS / "sd1"), device="cuda", max_vram=1.6,
                                          flags=("fp16",)), [Job(prompt="a"), Job(prompt="b", width=640)], True)
    # one load for the run: the smallest share any job needs, and every job planned with it
    assert planned.setup.unet_resident_gib == min(plan.unet_resident_gib for plan in planned.plans.values())
    assert {plan.unet_resident_gib for plan in planned.plans.values()} == {planned.setup.unet_resident_gib}


def test_streamed_units_are_the_fewest_largest_that_bring_the_unet_under_budget():
    unet = models.build_tiny().unet
    total = offload.module_bytes(unet) / offload.GIB
    budget = total * 0.6
    chosen = offload.streamed_units(unet, budget)
    streamed = sum(offload.module_bytes(unit) for _name, unit in chosen) / offload.GIB
    assert total - streamed <= budget < total - streamed + offload.module_bytes(chosen[-1][1]) / offload.GIB
    sizes = [offload.module_bytes(unit) for _name, unit in chosen]
    assert sizes == sorted(sizes, reverse=True)
    names = [name for name, _unit in offload.unet_units(unet)]
    assert any(".transformer_blocks." in name for name in names) and any(".resnets." in name for name in names)
    assert offload.streamed_units(unet, total) == []


def test_a_partly_streamed_unet_computes_what_the_resident_one_does():
    pipe = models.build_tiny()
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        resident = unet(x, 500, encoder_hidden_states=context).sample
        note = offload.stream_unet_partly(unet, torch.device("cpu"), offload.module_bytes(unet) / offload.GIB / 2)
        hooked = [m for m in unet.modules() if getattr(m, "_diffusers_hook", None) is not None]
        streamed = unet(x, 500, encoder_hidden_states=context).sample
        again = unet(x, 500, encoder_hidden_states=context).sample
    assert hooked and "streamed from CPU memory" in note
    assert torch.equal(resident, streamed) and torch.equal(resident, again)


def render_tiny(setup_change=lambda setup: setup, flags=()):
    run = RunConfig(model="tiny", flags=flags)
    job = Job(prompt="a red fox", steps=2, width=64, height=64, seed=3)
    planned = pipeline.plan_run(run, [job])
    engine = pipeline.load(planned.run, Reporter(quiet=True), setup_change(planned.setup))
    return np.asarray(render(engine, planned[job], job, [3]).images[0]), engine


def test_partial_residency_applied_at_load_keeps_the_image():
    plain, _ = render_tiny()
    partly, engine = render_tiny(lambda setup: replace(setup, unet_resident_gib=0.002))
    assert any(getattr(m, "_diffusers_hook", None) is not None for m in engine.pipe.unet.modules())
    assert np.array_equal(plain, partly)


@pytest.mark.parametrize("flag, hooked", [
    ("--cpu-offload", lambda module: getattr(module, "_diffusers_hook", None) is not None),
    ("--model-offload", lambda module: isinstance(getattr(module, "_hf_hook", None), offload.BringHook)),
])
def test_offloads_keep_the_image_on_sdruns_render_path(sdrun, monkeypatch, flag, hooked):
    """The offloads through the real CLI, their CUDA check lifted: hooks on the text encoder, on the UNet that
    sdrun's own loop calls and on the VAE whose decode sdrun calls; the image matches a run without them."""
    monkeypatch.setattr(Backend, "unavailable_reasons", lambda self, device: [])
    applied = []
    for name in ("stream_pipeline", "swap_models"):
        real = getattr(offload, name)
        monkeypatch.setattr(offload, name, lambda pipe, device, real=real: applied.append(pipe) or real(pipe, device))
    plain = sdrun("a red fox", *TINY, "--seed", "3", "-o", "plain.png")
    offloaded = sdrun("a red fox", *TINY, "--seed", "3", "-o", "offloaded.png", flag)
    assert plain.exit_code == 0 and offloaded.exit_code == 0, offloaded
    assert flag + ": " in offloaded.stderr
    pipe = applied[0]
    assert all(any(hooked(m) for m in component.modules()) for component in (pipe.text_encoder, pipe.unet, pipe.vae))
    assert np.array_equal(np.asarray(Image.open("plain.png")), np.asarray(Image.open("offloaded.png")))
    assert cpu_offload.BACKEND.places_pipeline


def test_model_swap_keeps_one_model_in_and_follows_a_dtype_change_made_while_away():
    pipe = models.build_tiny()
    swap = offload.ModelSwap(torch.device("cpu"))
    for model in (pipe.unet, pipe.vae):
        swap.add(model)

    def at_home(model) -> bool:
        return all(t.data_ptr() == home.data_ptr() for t, home in swap.homes[id(model)])

    swap.bring(pipe.unet)
    assert swap.current is pipe.unet and not at_home(pipe.unet) and at_home(pipe.vae)
    pipe.vae.to(dtype=torch.float64)  # as the decode's float32 upcast does, while the VAE is away
    swap.bring(pipe.vae)
    assert swap.current is pipe.vae and pipe.vae.dtype == torch.float64
    assert at_home(pipe.unet)  # put away: its tensors are its homes again, nothing copied back
    assert all(torch.equal(t.float(), home.float()) for t, home in swap.homes[id(pipe.vae)])
    swap.bring(pipe.unet)
    with torch.no_grad():  # the tiled decode calls the decoder itself, not the VAE's decode
        pipe.vae.tiled_decode(torch.zeros(1, 4, 8, 8))
    assert swap.current is pipe.vae


@pytest.mark.parametrize("component, streams", [("unet", True), ("text_encoder", True), ("partial", True),
                                               ("vae", False)])
def test_the_vae_streams_without_a_side_stream(component, streams):
    """The VAE's decode upcasts it to float32 on overflow, which pinned fp16 copies on a stream would undo."""
    assert offload.settings_for(torch.device("cuda"), component).get("use_stream", False) is streams
    assert not offload.settings_for(torch.device("cpu"), component).get("use_stream", False)


def test_the_unet_streams_one_resnet_attention_or_sampler_a_group():
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    pipe = models.build_tiny()
    offload.stream_pipeline(pipe, torch.device("cpu"))
    hooks = [m._diffusers_hook.get_hook(_GROUP_OFFLOADING) for m in pipe.unet.modules()
             if hasattr(m, "_diffusers_hook")]
    groups = {id(hook.group): hook.group for hook in hooks if hook is not None}
    parts = {id(part) for block in (*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks)
             for lists in block.children() if isinstance(lists, torch.nn.ModuleList) for part in lists}
    grouped = [group for group in groups.values() if group.modules and all(id(m) in parts for m in group.modules)]
    rest = [group for group in groups.values() if group not in grouped]
    assert len(grouped) >= 10 and all(len(group.modules) == 1 for group in grouped)
    assert len(rest) == 1 and rest[0].offload_leader is pipe.unet  # embeddings, conv_in, conv_out
