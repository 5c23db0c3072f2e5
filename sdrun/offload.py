"""Weights kept in pinned CPU memory and copied to the GPU as they are needed: `--cpu-offload` streams every
model block by block, `--max-vram`'s partial residency streams only the UNet parts that do not fit, and
`--model-offload` brings whole models in one at a time (ModelSwap, at the end).

Streaming is diffusers' group offloading: each group's weights are copied from a pinned CPU copy on a side CUDA
stream while the group before it computes (prefetch, in the order the first call traced), and dropped after its
own forward, so nothing is copied back: the pinned copy stays the weights' home. `record_stream` lets the host run
ahead instead of waiting for each group's compute before freeing its weights (under --max-vram the allocator,
at its limit, waits for those frees instead of failing).

- The UNet streams in groups of one resnet, one attention (transformer) or one sampler each: ~45 groups in SD 1.5,
  at most ~100 MB each, so a step pays a few dozen host syncs rather than one per layer (leaf level: ~900), and the
  largest groups sit at the lowest resolution, where activations are smallest. Its embeddings and first and last
  layers are one small group, on the GPU for the whole call.
- The text encoders stream layer by layer (leaf level): they run once per prompt, and a transformers model has no
  block structure group offloading could use without nesting its prefetch chains.
- The VAE streams layer by layer without a side stream: its decode is not its `forward` (so no call traces its
  order for the prefetch), and the decode upcasts it to float32 when fp16 overflows, which a stream's pinned fp16
  copies would undo; without a stream each layer's weights are moved where they are, in whatever dtype they have.
- Partial residency streams its UNet parts layer by layer: each part is a resnet or a transformer layer, whose
  children are layers, not block lists.

Swapping whole models (ModelSwap) copies each model in from its pinned home when it runs. Once a CUDA graph is to
record or replay the UNet's denoise (stages.py calls `bring_in_fixed`), every model is copied into one GPU buffer,
the arena: the size of the largest model, laid out per model when the model is added, so that each tensor comes
back to the same address every time, as a graph reads the addresses it was recorded with. The arena stays
allocated while the smaller models use it, so the GPU then holds the largest model's room through every stage
(render/memory.py counts it so). Until then, and in runs that never replay a graph (--max-vram,
--no-cuda-graphs, large sizes), each model brought in gets tensors of its own and gives their memory back when it
goes, so the decode does not hold the UNet's room.
"""

from typing import NamedTuple

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from accelerate.utils import send_to_device
from diffusers.hooks import apply_group_offloading

GIB = 2**30
LAYERS = {"offload_type": "leaf_level", "use_stream": True, "record_stream": True}
# block_modules: the block lists (and their entries, named by index) that group offloading descends into, so that
# the groups are the lists inside each block (resnets, attentions, samplers), one entry a group
UNET_PARTS = {"offload_type": "block_level", "num_blocks_per_group": 1, "use_stream": True, "record_stream": True,
              "block_modules": ["down_blocks", "mid_block", "up_blocks", *map(str, range(8))]}
# each tensor's place in --model-offload's arena starts at a multiple of it, as cudaMalloc aligns its own
# allocations: kernels that load wide vectors rely on that
ARENA_ALIGNMENT = 256
STREAMED = {"unet": UNET_PARTS, "text": LAYERS, "vae": {"offload_type": "leaf_level"}, "partial": LAYERS}
# What bench/memory.py measures, STREAMED first, so that the next choice is a one-line change.
CANDIDATES = {
    "UNet by resnet/attention, record_stream": STREAMED,
    "UNet by resnet/attention, synced frees": STREAMED | {"unet": UNET_PARTS | {"record_stream": False}},
    "UNet by layer, record_stream": STREAMED | {"unet": LAYERS},
    "UNet by layer, synced frees": STREAMED | {"unet": LAYERS | {"record_stream": False}},
}


def settings_for(device: torch.device, component: str, profile: dict = STREAMED) -> dict:
    """Group-offloading options for one pipeline component ("unet", "vae", "partial", or a text or image
    encoder's name) on `device`: without CUDA streams (the CPU, in tests), the same grouping moved synchronously."""
    settings = profile.get(component, profile["text"])
    if device.type != "cuda":
        settings = {key: value for key, value in settings.items() if key not in ("use_stream", "record_stream")}
    return settings


def stream_pipeline(pipe, device: torch.device, profile: dict = STREAMED) -> str:
    """--cpu-offload: every model of `pipe` keeps its weights in CPU memory and streams them as it runs."""
    streamed = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            apply_group_offloading(component, onload_device=device, **settings_for(device, name, profile))
            streamed.append(name)
    return f"--cpu-offload: {', '.join(streamed)} streamed from CPU memory as they run"


def unet_units(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's parts that partial residency streams or keeps whole: each resnet, sampler and transformer layer
    of its down, mid and up blocks (a transformer's own projections and norm stay with it: they are small)."""
    units = []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)] \
        + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for block_name, block in blocks:
        if block is None:
            continue
        for list_name, parts in block.named_children():
            if not isinstance(parts, torch.nn.ModuleList):
                continue
            for index, part in enumerate(parts):
                name = f"{block_name}.{list_name}.{index}"
                layers = getattr(part, "transformer_blocks", None)
                if isinstance(layers, torch.nn.ModuleList):
                    units += [(f"{name}.transformer_blocks.{k}", layer) for k, layer in enumerate(layers)]
                else:
                    units.append((name, part))
    return units


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(map(tensor_bytes, (*module.parameters(), *module.buffers())))


def streamed_units(unet: torch.nn.Module, resident_gib: float) -> list[tuple[str, torch.nn.Module]]:
    """The units to stream so that at most `resident_gib` of the UNet's weights stay on the GPU: the largest first,
    the fewest layers to hook for the bytes they free."""
    resident = module_bytes(unet)
    chosen = []
    for name, unit in sorted(unet_units(unet), key=lambda item: -module_bytes(item[1])):
        if resident <= resident_gib * GIB:
            break
        chosen.append((name, unit))
        resident -= module_bytes(unit)
    return chosen


def stream_unet_partly(unet: torch.nn.Module, device: torch.device, resident_gib: float) -> str:
    """Partial residency: stream the units that do not fit in `resident_gib`, move the rest to `device` (pipe.to
    then leaves the UNet alone: diffusers does not move a group-offloaded model)."""
    total = module_bytes(unet)
    chosen = streamed_units(unet, resident_gib)
    for _name, unit in chosen:
        apply_group_offloading(unit, onload_device=device, **settings_for(device, "partial"))
    _move_resident(unet, {id(unit) for _name, unit in chosen}, device)
    streamed = sum(module_bytes(unit) for _name, unit in chosen)
    return (f"partial residency: {(total - streamed) / GIB:.2f} of the UNet's {total / GIB:.2f} GiB of weights on "
            f"the GPU, {len(chosen)} of its {len(unet_units(unet))} blocks streamed from CPU memory")


def _move_resident(module: torch.nn.Module, streamed: set[int], device: torch.device) -> None:
    """Move every parameter and buffer of `module` to `device`, except those inside the `streamed` modules."""
    if id(module) in streamed:
        return
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        tensor.data = tensor.data.to(device)
    for child in module.children():
        _move_resident(child, streamed, device)


class Slot(NamedTuple):
    """One tensor of a swapped model: the tensor, its home in CPU memory, and its place in the arena (a byte offset)."""

    tensor: torch.Tensor
    home: torch.Tensor
    offset: int


class ModelSwap:
    """--model-offload: one model on the GPU at a time, each one's home a pinned CPU copy of its weights, each
    brought into the same GPU buffer (the arena) at the same places every time. Bringing a model in copies it
    (non-blocking, on the compute stream, so the kernels that read it queue after the copy); putting one away points
    its tensors back at their homes and copies nothing back, since weights do not change during a render
    (diffusers' enable_model_cpu_offload moves each model back from the GPU to pageable memory instead). Every
    model is added before `fix_addresses` allocates the arena for the largest; before it, each model brought in
    gets tensors of its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current = None
        self.slots = {}  # id(model) -> [Slot]: its tensors and their layout in the arena, fixed when it is added
        self.arena_bytes = 0  # the largest model's layout
        self.arena = None  # allocated by fix_addresses

    def add(self, model: torch.nn.Module) -> None:
        tensors = list(dict.fromkeys((*model.parameters(), *model.buffers())))
        if self.device.type == "cuda":  # pinned: copied in at full PCIe speed, and without blocking the host
            for tensor in tensors:
                tensor.data = tensor.data.pin_memory()
        slots, end = [], 0
        for tensor in tensors:
            slots.append(Slot(tensor, tensor.data, end))
            end += tensor_bytes(tensor)
            end += -end % ARENA_ALIGNMENT  # the next place starts aligned
        self.slots[id(model)] = slots
        self.arena_bytes = max(self.arena_bytes, end)
        # its children too: the VAE's tiled decode and encode call its decoder and encoder, not decode or encode
        for module in (model, *model.children()):
            add_hook_to_module(module, BringHook(self, model))

    def bring(self, model: torch.nn.Module) -> None:
        if self.current is model:
            return
        if self.current is not None:  # what code put in while it was in (the decode's float32 copies) goes too
            for slot in self.slots[id(self.current)]:
                slot.tensor.data = slot.home
        for slot in self.slots[id(model)]:
            slot.tensor.data = self._copied_in(slot)
        self.current = model

    def fix_addresses(self) -> None:
        """From now on every model comes in to its places in the arena (allocated now), the model in use too."""
        if self.arena is not None:
            return
        self.arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device)
        current, self.current = self.current, None
        if current is not None:
            self.bring(current)

    def _copied_in(self, slot: Slot) -> torch.Tensor:
        """The slot's home copied into its place in the arena, or before fix_addresses to a tensor of its own; a
        copy even on the CPU, so a model in use never writes to its home. A tensor whose dtype changed while its
        model was away (the decode's float32 upcast) no longer fits its place: it is copied, in its dtype, to a
        tensor of its own."""
        tensor, home, offset = slot
        if self.arena is None or tensor.dtype != home.dtype:
            return home.to(self.device, dtype=tensor.dtype, non_blocking=True, copy=True)
        # in the home's strides (a parameter is dense: its span is its size), so --channels-last weights keep theirs
        place = self.arena[offset:offset + tensor_bytes(home)].view(home.dtype).as_strided(home.shape, home.stride())
        return place.copy_(home, non_blocking=True)


def bring_in_fixed(model: torch.nn.Module) -> None:
    """If --model-offload swaps `model` (else nothing): models come in to fixed addresses from now on, and this one
    is brought in now. A CUDA graph records the addresses it reads, and its replay runs no forward, so no
    BringHook brings in the UNet it reads."""
    hook = getattr(model, "_hf_hook", None)
    if isinstance(hook, BringHook):
        hook.swap.fix_addresses()
        hook.swap.bring(hook.model)


class BringHook(ModelHook):
    """Brings its model in before it runs: accelerate's hook protocol, which diffusers also calls from the VAE's
    encode and decode, and whose execution_device tells get_module_execution_device where inputs go."""

    def __init__(self, swap: ModelSwap, model: torch.nn.Module):
        self.swap, self.model, self.execution_device = swap, model, swap.device

    def pre_forward(self, module, *args, **kwargs):
        self.swap.bring(self.model)
        return send_to_device(args, self.swap.device), send_to_device(kwargs, self.swap.device)


def swap_models(pipe, device: torch.device) -> str:
    """--model-offload: every model of `pipe` in CPU memory, each brought to `device` when it runs."""
    swap = ModelSwap(device)
    names = [name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)]
    for name in names:
        swap.add(getattr(pipe, name))
    return f"--model-offload: {', '.join(names)} on the GPU one at a time, each copied in from pinned CPU memory"
