"""fp8 weight storage, quality: the relative error of one UNet call with its weights stored in float8_e4m3fn,
sdrun's storage (sdrun/fp8_storage.py: biases, conv_in/conv_out and the embeddings kept) beside diffusers'
`enable_layerwise_casting` (biases in fp8 too), against the same UNet unquantized. Seeded random weights of the
real architecture (configs/), fp32 compute, so it runs on a CPU; a real checkpoint's figures will differ.

    python bench/fp8_quality.py sd1 32       # family, latent side
"""

import argparse

import torch
from diffusers import UNet2DConditionModel

from sdrun.fp8_storage import store_in_fp8
from sdrun.model_source import CONFIGS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=["tiny", "sd1", "sd2", "sdxl"])
    parser.add_argument("side", type=int, help="latent pixels per side")
    args = parser.parse_args()
    config = UNet2DConditionModel.load_config(CONFIGS / args.family / "unet")

    def build() -> UNet2DConditionModel:
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(config).eval()

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.side, args.side, generator=generator)
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=generator)
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=generator),
                                      "time_ids": torch.randn(1, 6, generator=generator)}

    def call(unet) -> torch.Tensor:
        with torch.no_grad():
            return unet(x, 500, encoder_hidden_states=context, return_dict=False, **extra)[0]

    unet = build()
    reference = call(unet)
    store_in_fp8(unet, "unet", torch.float32)
    ours = call(unet)
    del unet
    unet = build()
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    theirs = call(unet)
    error = {name: ((out - reference).norm() / reference.norm()).item() for name, out in
             (("sdrun", ours), ("diffusers layerwise casting", theirs))}
    print(f"{args.family} at {args.side}x{args.side} latents, relative error of one UNet call: "
          + ", ".join(f"{name} {value:.4f}" for name, value in error.items()))


if __name__ == "__main__":
    main()
