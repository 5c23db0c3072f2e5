"""Weights streamed from CPU memory: --cpu-offload (every model) and --max-vram's partial residency (the UNet parts
that do not fit), and whole models swapped through one arena (--model-offload). On the CPU the weights' home and
the device are the same memory, so these tests check what does not depend on a GPU: the planner's choice, which
blocks stream for a budget, the arena's layout and addresses, and that the hooks leave the image unchanged on
sdrun's own render path."""

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
from sdrun.render import memory, plan as render_plan
from sdrun.render.stages import render

from conftest import TINY

SD1 = render_plan.ModelInfo("sd1", 512, 8)


def sd1_plan(max_vram: float, flags=("fp16",)) -> render_plan.RenderPlan:
    return render_plan.make_plan(RunConfig(max_vram=max_vram, flags=flags), Job(prompt="x"), SD1, "cuda",
                                 budget=max_vram)


def test_partial_residency_comes_between_fitting_whole_and_offloading_the_model():
    whole, partial, offloaded = sd1_plan(2.2), sd1_plan(1.6), sd1_plan(0.8)  # 0.9: 0.01 GiB of the UNet stays
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


JOB = Job(prompt="a red fox", steps=2, width=64, height=64, seed=3)


def render_tiny(setup_change=lambda setup: setup):
    planned = pipeline.plan_run(RunConfig(model="tiny"), [JOB])
    engine = pipeline.load(planned.run, Reporter(quiet=True), setup_change(planned.setup))
    return np.asarray(render(engine, planned[JOB], JOB, [3]).images[0]), engine


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


def swapped_tiny():
    """The tiny pipeline's three models swapped on the CPU: there the arena is CPU memory, laid out as on a GPU.
    The UNet's convolutions in channels-last strides, as --channels-last leaves them, which the arena keeps."""
    pipe = models.build_tiny()
    pipe.unet.to(memory_format=torch.channels_last)
    swap = offload.ModelSwap(torch.device("cpu"))
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        swap.add(model)
    return pipe, swap


def addresses(swap, model) -> list[int]:
    return [slot.tensor.data_ptr() for slot in swap.slots[id(model)]]


def in_arena(swap, model) -> list[bool]:
    start = swap.arena.data_ptr()
    return [start <= slot.tensor.data_ptr() and slot.tensor.data_ptr() + offload.tensor_bytes(slot.tensor)
            <= start + swap.arena.numel() for slot in swap.slots[id(model)]]


def at_home(swap, model) -> bool:
    return all(slot.tensor.data_ptr() == slot.home.data_ptr() for slot in swap.slots[id(model)])


def equal_to_homes(swap, model) -> bool:
    return all(torch.equal(slot.tensor.double(), slot.home.double()) for slot in swap.slots[id(model)])


def test_model_swap_lays_each_model_out_once_in_an_arena_sized_for_the_largest():
    pipe, swap = swapped_tiny()
    ends = []
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        slots = sorted(swap.slots[id(model)], key=lambda slot: slot.offset)
        assert all(slot.offset % offload.ARENA_ALIGNMENT == 0 for slot in slots)
        assert all(a.offset + offload.tensor_bytes(a.home) <= b.offset for a, b in zip(slots, slots[1:]))  # apart
        assert len(slots) == len(set(map(id, (*model.parameters(), *model.buffers()))))  # every tensor, once
        ends.append(slots[-1].offset + offload.tensor_bytes(slots[-1].home))
    assert max(ends) <= swap.arena_bytes < max(ends) + offload.ARENA_ALIGNMENT
    swap.bring(pipe.unet)
    assert swap.arena is None and not at_home(swap, pipe.unet)  # no graph asked for fixed addresses: own tensors
    swap.fix_addresses()
    assert swap.arena.numel() == swap.arena_bytes
    assert swap.current is pipe.unet and all(in_arena(swap, pipe.unet)) and equal_to_homes(swap, pipe.unet)


def test_before_fixed_addresses_a_model_put_away_gives_its_memory_back():
    """Runs that replay no graph keep today's peak: the decode does not hold the UNet's room."""
    pipe, swap = swapped_tiny()
    swap.bring(pipe.unet)
    assert equal_to_homes(swap, pipe.unet) and not at_home(swap, pipe.unet)
    swap.bring(pipe.vae)
    assert at_home(swap, pipe.unet) and swap.arena is None  # the UNet's copies: referenced by nothing now


def test_model_swap_brings_a_model_back_to_the_same_addresses_with_its_homes_values():
    """What lets a CUDA graph recorded with the UNet in replay after the VAE has used the arena."""
    pipe, swap = swapped_tiny()
    swap.fix_addresses()
    swap.bring(pipe.unet)
    assert all(slot.tensor.stride() == slot.home.stride() for slot in swap.slots[id(pipe.unet)])
    arena, first = swap.arena, addresses(swap, pipe.unet)
    assert all(in_arena(swap, pipe.unet)) and equal_to_homes(swap, pipe.unet) and not at_home(swap, pipe.unet)
    swap.bring(pipe.vae)
    assert all(in_arena(swap, pipe.vae)) and equal_to_homes(swap, pipe.vae)
    assert addresses(swap, pipe.vae)[0] == first[0]  # both start at the arena's start: the VAE wrote over the UNet
    assert at_home(swap, pipe.unet)  # put away: its tensors are its homes again, nothing copied back
    swap.bring(pipe.unet)
    assert swap.arena is arena and addresses(swap, pipe.unet) == first and equal_to_homes(swap, pipe.unet)


def test_model_swap_follows_a_dtype_change_made_while_away_and_drops_copies_made_while_in():
    pipe, swap = swapped_tiny()
    swap.fix_addresses()
    swap.bring(pipe.unet)
    pipe.vae.to(dtype=torch.float64)  # as the decode's float32 upcast does, while the VAE is away
    swap.bring(pipe.vae)
    assert swap.current is pipe.vae and pipe.vae.dtype == torch.float64 and at_home(swap, pipe.unet)
    assert not any(in_arena(swap, pipe.vae)) and equal_to_homes(swap, pipe.vae)  # too big for its places
    swap.bring(pipe.unet)
    assert at_home(swap, pipe.vae) and pipe.vae.dtype == torch.float32  # its float64 copies dropped
    swap.bring(pipe.vae)
    assert all(in_arena(swap, pipe.vae))
    pipe.vae.to(dtype=torch.float64).to(dtype=torch.float32)  # as the decode's upcast does while the VAE is in
    assert not any(in_arena(swap, pipe.vae))
    swap.bring(pipe.unet)
    assert at_home(swap, pipe.vae)
    with torch.no_grad():  # the tiled decode calls the decoder itself, not the VAE's decode
        pipe.vae.tiled_decode(torch.zeros(1, 4, 8, 8))
    assert swap.current is pipe.vae and all(in_arena(swap, pipe.vae))


def test_bring_in_fixed_brings_a_swapped_model_into_the_arena_and_leaves_any_other_alone():
    pipe, swap = swapped_tiny()
    swap.bring(pipe.vae)
    offload.bring_in_fixed(pipe.unet)  # as the denoise does before replaying a graph: no forward runs to bring it
    assert swap.current is pipe.unet and all(in_arena(swap, pipe.unet)) and equal_to_homes(swap, pipe.unet)
    plain = models.build_tiny().unet
    before = [tensor.data_ptr() for tensor in plain.parameters()]
    offload.bring_in_fixed(plain)
    assert [tensor.data_ptr() for tensor in plain.parameters()] == before and swap.current is pipe.unet


def test_a_replayed_denoise_finds_the_unet_brought_back_into_the_arena(monkeypatch):
    """What a CUDA graph's replay needs, on the CPU: a stand-in recording (it runs the loop eagerly) finds the UNet
    in, though the text encoder ran last and no UNet forward has run since (stages.denoise calls
    bring_in_fixed)."""
    monkeypatch.setattr(Backend, "unavailable_reasons", lambda self, device: [])
    planned = pipeline.plan_run(RunConfig(model="tiny", flags=("model_offload",)), [JOB])
    engine = pipeline.load(planned.run, Reporter(quiet=True), planned.setup)
    swap, in_at_replay = engine.pipe.unet._hf_hook.swap, []

    class StandInRecording:
        def __init__(self, loop, timesteps, scheduler):
            self.loop, self.timesteps, self.scheduler = loop, timesteps, scheduler

        def run(self, x, cond):
            in_at_replay.append((swap.current, all(in_arena(swap, swap.current))))
            return self.loop(x, cond, self.timesteps, self.scheduler)

    class Everything:
        def __contains__(self, _key):
            return True

    class StandInGraphs:
        seen = Everything()  # every key met before: recorded now, or replayed

        def recording(self, key, loop, x, cond, timesteps, scheduler, warm_up):
            return StandInRecording(loop, timesteps, scheduler)

        def first_sight(self, key):
            return False

    engine.graphs = StandInGraphs()
    rendered = render(engine, planned[JOB], JOB, [3])
    assert rendered.cuda_graph and in_at_replay == [(engine.pipe.unet, True)]
    assert np.array_equal(np.asarray(rendered.images[0]), render_tiny()[0])


def test_model_offload_plans_the_largest_models_room_in_every_stage_when_a_graph_replays():
    """The arena stays allocated while the text encoder and the VAE use part of it; without a graph to replay
    (--no-cuda-graphs here; --max-vram, large sizes) each stage holds only its own model."""
    arch = memory.ARCHITECTURES["sd1"]
    unet = arch.unet * 1e6 * 2 / memory.GIB
    fixed = memory.Placement("model", 2, fixed_addresses=True)
    assert [memory.weights_gib(arch, fixed, part) for part in ("text", "unet", "vae")] == [unet] * 3
    assert memory.weights_gib(arch, memory.Placement("model", 2), "vae") < unet / 5

    def decode_peak(**run) -> float:
        plan = render_plan.make_plan(RunConfig(flags=("fp16", "model_offload"), **run), Job(prompt="x"), SD1, "cuda")
        return next(stage for stage in plan.stages if stage.name == "decode").peak_gib

    assert decode_peak() > unet > decode_peak(cuda_graphs=False)


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
