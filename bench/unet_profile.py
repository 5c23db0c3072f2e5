"""Where a UNet forward's GPU time goes, by kind of kernel, and what a CUDA graph replay of it costs.

SD 1.5 architecture, random weights, fp16, PyTorch SDPA (or sdrun's kernel with --xformers, sdrun's fused
GroupNorm + SiLU with --fused-norms, its one-pass GEGLU with --fused-geglu: together what sdrun's --xformers
installs, the time embedding and conv1's bias added as the second norm of each ResNet block reads, conv2's bias
by the shortcut; --time-add-apart adds the time embedding in a pass of its own first, as diffusers does;
--biases-apart leaves each convolution its own bias pass, as before the eleventh session); with --nhwc-outputs,
the transformers' output step without the copy to NCHW that --channels-last installs, and with --pointwise-gemms
its 1x1 convolutions as GEMMs with the bias in the epilogue, which only change the `cl` cases; with
--packed-projections, each attention's q, k, v (k, v in cross-attention) projected by one GEMM, and with
--fused-norms every ResNet block's time embedding by one GEMM, as sdrun's --xformers lays them out once the model
is on the GPU; with --fused-layer-norms, each transformer block's LayerNorms on sdrun's kernel, the residual
additions before them in the same pass; with --compile, the named blocks compiled by torch.compile, regional
compilation as diffusers' compile_repeated_blocks does it). For each case: the replayed forward in ms (CUDA
events, median of 20) and the profiler's GPU time per kernel kind for one eager forward. Kernel kinds are read
from the kernel names (cuDNN's and CUTLASS's convolutions, layout transposes, GroupNorm's kernels, GEMMs,
attention, elementwise).

    python bench/unet_profile.py [--cases 512x2,512x2cl,512x32cl,1024x2] [--xformers] [--fused-norms] [--fused-geglu]
                                 [--nhwc-outputs] [--pointwise-gemms] [--packed-projections]
                                 [--fused-layer-norms] [--time-add-apart] [--biases-apart]
                                 [--compile BasicTransformerBlock,ResnetBlock2D] [--cudnn-benchmark] [--top N]
"""

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import UNet2DConditionModel  # noqa: E402

from group_norm import replayed_us  # noqa: E402

from sdrun import models  # noqa: E402

KINDS = (  # first match wins
    ("layout transpose", r"nchwToNhwc|nhwcToNchw|convertTensor|transpose"),
    ("group norm", r"GroupNorm|group_norm|RowwiseMoments|ComputeFusedParams"),  # sdrun's: (GroupNormParams)
    ("attention", r"fmha|flash|attn|attention|cudnn_generated_fort_native_sdpa|mem_eff"),
    ("convolution", r"conv|implicit_gemm|xmma_fprop|sm90_xmma|dgrad|fprop|cudnn"),
    ("gemm", r"gemm|cutlass|nvjet|ampere_|sm80_|sm90_"),
    ("layer norm", r"layer_norm|LayerNorm"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|add|mul|copy|cat|Reduce|reduce"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


class TimeAddedApart(torch.nn.Module):
    """--time-add-apart: a ResNet block's second norm receiving the time embedding adds it in a pass of its own
    first, as diffusers' block does, and then normalises (what sdrun's fused norms did before they folded it in)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, channel_add=None):
        return self.norm(x if channel_add is None else x + channel_add[:, :, None, None])


def replayed_ms(unet, sample, context) -> float:
    timestep = torch.tensor(500, device=sample.device)  # on the GPU: a graph cannot copy a host scalar in
    forward = torch.no_grad()(lambda: unet(sample, timestep, context))
    return replayed_us(forward, calls=1, warmups=3, replays=25, dropped=5) / 1000


def profile(unet, sample, context) -> tuple[collections.Counter, collections.Counter]:
    """GPU ms of one eager forward by kernel kind (and the count of its kernels, as "kernels"), and by kernel name."""
    timestep = torch.tensor(500, device=sample.device)
    with torch.no_grad():
        unet(sample, timestep, context)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            unet(sample, timestep, context)
            torch.cuda.synchronize()
    totals = collections.Counter()
    names = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[kind_of(event.name)] += event.device_time / 1000
            totals["kernels"] += 1
            names[event.name[:90]] += event.device_time / 1000
    return totals, names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="512x2,512x2cl,512x32cl,1024x2")
    parser.add_argument("--xformers", action="store_true")
    parser.add_argument("--fused-norms", action="store_true")
    parser.add_argument("--fused-geglu", action="store_true")
    parser.add_argument("--nhwc-outputs", action="store_true")
    parser.add_argument("--time-add-apart", action="store_true")
    parser.add_argument("--biases-apart", action="store_true")
    parser.add_argument("--pointwise-gemms", action="store_true")
    parser.add_argument("--packed-projections", action="store_true")
    parser.add_argument("--fused-layer-norms", action="store_true")
    parser.add_argument("--compile", help="comma-separated block classes to compile one by one (torch.compile)")
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest kernels of each case")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(models.CONFIGS / "sd1" / "unet"))
    unet = unet.half().eval()
    if args.xformers or args.fused_norms or args.fused_geglu or args.fused_layer_norms:
        from sdrun import ops
        from sdrun.ops.feed_forward import install_fused_geglu
        from sdrun.ops.norms import install_fused_norms
        from sdrun.ops.processor import install

        ops.load()  # the fused norms and GEGLU, too, run on the kernel only once it is loaded
        if args.xformers:
            install(unet)
        if args.fused_norms:
            install_fused_norms(unet)
            if args.time_add_apart:
                for block in [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]:
                    block.norm2 = TimeAddedApart(block.norm2)
            if args.biases_apart:  # a hook makes the rewired blocks run each convolution whole (ops.pointwise)
                for conv in [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]:
                    conv.register_forward_pre_hook(lambda *args: None)
        if args.fused_geglu:
            install_fused_geglu(unet)
        if args.fused_layer_norms:
            from sdrun.ops.layer_norms import install_fused_layer_norms

            install_fused_layer_norms(unet)
    if args.nhwc_outputs:
        from sdrun.backends.channels_last import install_transformer_outputs

        install_transformer_outputs(unet)
    if args.pointwise_gemms:
        from sdrun.ops.pointwise import install_pointwise_convs

        install_pointwise_convs(unet)
    if args.packed_projections:
        from sdrun.ops.norms import pack_time_projections
        from sdrun.ops.processor import pack_projections

        pack_projections(unet)
        pack_time_projections(unet)  # with --fused-norms: the ResNet blocks' time projections
    if args.compile:
        blocks = args.compile.split(",")
        compiled = [m.compile(fullgraph=True) or m for m in unet.modules() if type(m).__name__ in blocks]
        assert compiled, f"no block of the classes {blocks}"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, xformers={args.xformers}, "
          f"fused norms={args.fused_norms} (time add apart: {args.time_add_apart}, biases apart: {args.biases_apart}), "
          f"fused GEGLU={args.fused_geglu}, NHWC outputs={args.nhwc_outputs}, pointwise GEMMs={args.pointwise_gemms}, "
          f"packed projections={args.packed_projections}, fused layer norms={args.fused_layer_norms}, "
          f"compiled blocks={args.compile}, cuDNN benchmark={args.cudnn_benchmark}")
    rows = []
    for case in args.cases.split(","):
        size, rest = case.split("x")
        channels_last = rest.endswith("cl")
        batch = int(rest.removesuffix("cl"))
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        sample = torch.randn(batch, 4, int(size) // 8, int(size) // 8, device="cuda", dtype=torch.float16)
        if channels_last:
            sample = sample.to(memory_format=torch.channels_last)
        context = torch.randn(batch, 77, 768, device="cuda", dtype=torch.float16)
        start = time.perf_counter()
        with torch.no_grad():
            unet(sample, torch.tensor(500, device="cuda"), context)  # compiles the compiled blocks for this shape
        torch.cuda.synchronize()
        print(f"## {case}: first forward {time.perf_counter() - start:.1f} s", flush=True)
        graph_ms = replayed_ms(unet, sample, context)
        totals, names = profile(unet, sample, context)
        rows.append((case, graph_ms, totals))
        if args.top:
            print(f"## {case}: costliest kernels, ms")
            for name, ms in names.most_common(args.top):
                print(f"  {ms:8.3f}  {name}")
        torch.cuda.empty_cache()
    kinds = [kind for kind, _ in KINDS] + ["other"]
    print("| case | replayed ms | eager GPU ms | kernels | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 4) + "|")
    for case, graph_ms, totals in rows:
        print(f"| {case} | {graph_ms:.2f} | {sum(totals[kind] for kind in kinds):.2f} | {totals['kernels']} | "
              + " | ".join(f"{totals.get(kind, 0):.2f}" for kind in kinds) + " |")


if __name__ == "__main__":
    main()
