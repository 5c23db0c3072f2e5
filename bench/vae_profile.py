"""Where an untiled VAE decode's GPU time and memory go, per layout and per rewiring, as sdrun decodes.

SD 1.5's VAE architecture, random weights, fp16, one image. Each variant decodes as `render/vae.py` does (an NCHW
decoder's large convolutions in bands, a channels-last one whole) after a warm-up decode; then the median of
--repeats decodes (CUDA events), the peak above the weights (max_memory_allocated), and the profiler's GPU time
per kernel kind for one decode (the kinds of bench/unet_profile.py). Variants:
- nchw, cl: diffusers' modules, in each layout (what a run without --xformers decodes with);
- nchw+k, cl+k: sdrun's kernels (--xformers: GroupNorm fused with its SiLU, conv1's bias added by it, conv2's by
  the shortcut), and for cl+k the 1x1 convolutions as GEMMs (--channels-last);
- cl+k-apart: cl+k with each convolution's bias in a pass of its own (as before the eleventh session).

    python bench/vae_profile.py [--sizes 512,1024] [--variants nchw,cl,nchw+k,cl+k,cl+k-apart] [--repeats 5]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import AutoencoderKL  # noqa: E402

from unet_profile import KINDS, kind_of  # noqa: E402

from sdrun import models  # noqa: E402
from sdrun.render import banded_decode  # noqa: E402


def build(variant: str) -> AutoencoderKL:
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(models.CONFIGS / "sd1" / "vae"))
    vae = vae.half().eval()
    layout, _, rewiring = variant.partition("+")
    if layout == "cl":
        vae.to(memory_format=torch.channels_last)
    if rewiring:
        from sdrun import ops
        from sdrun.ops.norms import install_fused_norms
        from sdrun.ops.pointwise import install_pointwise_convs

        ops.load()
        if layout == "cl":
            install_pointwise_convs(vae)
        install_fused_norms(vae, "VAE")
        if rewiring.endswith("-apart"):  # a hook makes the rewired blocks run each convolution whole
            for conv in [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]:
                conv.register_forward_pre_hook(lambda *args: None)
    return vae


def decode(vae, latents):
    with torch.no_grad(), banded_decode.banded(vae.decoder):
        return vae.decode(latents, return_dict=False)[0]


def measure(vae, latents, repeats: int):
    decode(vae, latents)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode(vae, latents)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    decode(vae, latents)
    peak = (torch.cuda.max_memory_allocated() - weights) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode(vae, latents)
        torch.cuda.synchronize()
    kinds = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kind_of(event.name)
            kinds[kind] = kinds.get(kind, 0) + event.device_time / 1000
    return statistics.median(times), peak, kinds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--variants", default="nchw,cl,nchw+k,cl+k,cl+k-apart")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, SD 1.5 VAE, fp16, one image")
    kinds = [kind for kind, _ in KINDS] + ["other"]
    print("| size | variant | ms | peak MiB | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 4) + "|")
    for variant in args.variants.split(","):
        vae = build(variant)
        for size in map(int, args.sizes.split(",")):
            latents = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=torch.float16,
                                  generator=torch.Generator("cuda").manual_seed(size))
            if variant.startswith("cl"):
                latents = latents.to(memory_format=torch.channels_last)
            ms, peak, by_kind = measure(vae, latents, args.repeats)
            print(f"| {size} | {variant} | {ms:.1f} | {peak:,.0f} | "
                  + " | ".join(f"{by_kind.get(kind, 0):.1f}" for kind in kinds) + " |", flush=True)
        del vae
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
