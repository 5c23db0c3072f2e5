"""Weights kept in pinned CPU memory and copied to the GPU as they are needed: `--cpu-offload` streams every
model layer by layer, `--max-vram`'s partial residency streams only the UNet parts that do not fit, and
`--model-offload` brings whole models in one at a time (ModelSwap, at the end).

Both use diffusers' group offloading at leaf level (every linear, convolution and embedding layer is a group; the
norms' few weights ride with their parent module): each layer's weights are copied from a pinned CPU copy on a
side CUDA stream while the layer before it computes (prefetch, in the order the first call traced), and dropped
after its own forward, so nothing is copied back: the pinned copy stays the weights' home. `record_stream` lets
the host run ahead instead of waiting for each layer's compute before freeing its weights; under --max-vram the
allocator's limit waits for those frees when the budget is reached, so the run still fits.

The VAE streams without a side stream: its decode is not its `forward` (so no call traces its order for the
prefetch), and the decode upcasts it to float32 when fp16 overflows, which a stream's pinned fp16 copies would
undo; without a stream each layer's weights are moved where they are, in whatever dtype they have.
"""

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from accelerate.utils import send_to_device
from diffusers.hooks import apply_group_offloading

GIB = 2**30
STREAMED = {"offload_type": "leaf_level", "use_stream": True, "record_stream": True}
UNSTREAMED = {"offload_type": "leaf_level"}  # no side stream: the VAE, and every model on a device without streams
# The configurations bench/memory.py measures beside STREAMED, so the next choice is a one-line change.
CANDIDATES = {
    "leaf, stream, record_stream": STREAMED,
    "leaf, stream, synced frees": {"offload_type": "leaf_level", "use_stream": True},
    "block, 1 per group, stream, record_stream": {"offload_type": "block_level", "num_blocks_per_group": 1,
                                                  "use_stream": True, "record_stream": True},
}


def settings_for(device: torch.device, component: str, settings: dict = STREAMED) -> dict:
    """Group-offloading options for one pipeline component on `device`."""
    if component == "vae" or device.type != "cuda":
        return UNSTREAMED
    return settings


def stream_pipeline(pipe, device: torch.device, settings: dict = STREAMED) -> str:
    """--cpu-offload: every model of `pipe` keeps its weights in CPU memory and streams them layer by layer."""
    streamed = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            apply_group_offloading(component, onload_device=device, **settings_for(device, name, settings))
            streamed.append(name)
    return f"--cpu-offload: {', '.join(streamed)} streamed layer by layer from CPU memory"


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


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


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
        apply_group_offloading(unit, onload_device=device, **settings_for(device, "unet"))
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



class ModelSwap:
    """--model-offload: one model on the GPU at a time, each one's home a pinned CPU copy of its weights. Bringing
    a model in copies it (non-blocking, on the compute stream, so the kernels that read it queue after the copy);
    putting one away drops its GPU copy and copies nothing back, since weights do not change during a render
    (diffusers' enable_model_cpu_offload moves each model back from the GPU to pageable memory instead)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current = None
        self.homes = {}  # id(model) -> [(tensor, its home in CPU memory)]

    def add(self, model: torch.nn.Module) -> None:
        tensors = list(dict.fromkeys((*model.parameters(), *model.buffers())))
        if self.device.type == "cuda":  # pinned: copied in at full PCIe speed, and without blocking the host
            for tensor in tensors:
                tensor.data = tensor.data.pin_memory()
        self.homes[id(model)] = [(tensor, tensor.data) for tensor in tensors]
        add_hook_to_module(model, BringHook(self, model))

    def bring(self, model: torch.nn.Module) -> None:
        if self.current is model:
            return
        if self.current is not None:
            for tensor, home in self.homes[id(self.current)]:
                tensor.data = home
        # in the tensor's dtype, which the decode's float32 upcast may have changed while the model was away; a
        # copy even where device and dtype are the home's (the CPU), so a model in use never writes to its home
        for tensor, home in self.homes[id(model)]:
            tensor.data = home.to(self.device, dtype=tensor.dtype, non_blocking=True, copy=True)
        self.current = model


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
