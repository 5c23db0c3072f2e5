"""LoRA files and textual-inversion embeddings (sdrun/adapters.py) through the real CLI on the tiny model, with
files the tests write in the real layouts (kohya/A1111 and diffusers LoRAs, A1111 embeddings); A1111's hashes."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, meta, pixels
from safetensors.torch import save_file
from sd_layout import tiny_sdxl, write_ip_adapter

from sdrun import hashes, models

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
RUN = (*TINY, "--seed", "4")


def lora_tensors(components: dict, layout: str, seed: int = 1) -> dict:
    """Random rank-4 LoRA weights for every attention projection of `components` ({prefix: module}), in the
    kohya layout (lora_unet_down_blocks_1_..._to_q.lora_down.weight, .alpha) or diffusers' (unet.....lora_A)."""
    generator, rank, out = torch.Generator().manual_seed(seed), 4, {}
    for prefix, module in components.items():
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(ATTENTION):
                down = torch.randn(rank, layer.in_features, generator=generator) * 0.3
                up = torch.randn(layer.out_features, rank, generator=generator) * 0.3
                if layout == "kohya":
                    key = prefix + name.replace(".", "_")
                    out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(float(rank))}
                else:
                    out |= {f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up}
    return out


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    pipe, xl = models.build_tiny(), tiny_sdxl()
    save_file(lora_tensors({"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder}, "kohya"),
              folder / "ink.safetensors")
    save_file(lora_tensors({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "diffusers", seed=2),
              folder / "chalk.safetensors")
    xl_lora = lora_tensors({"lora_unet_": xl.unet, "lora_te1_": xl.text_encoder}, "kohya")
    save_file(xl_lora, folder / "xl.safetensors")
    torch.save(xl_lora, folder / "xl.pt")  # a pickle: no header to check, so diffusers' loading finds out
    save_file(lora_tensors({"lora_te2_": xl.text_encoder_2}, "kohya"), folder / "xl-te2.safetensors")
    save_file({"model.diffusion_model.out.weight": torch.zeros(4)}, folder / "checkpoint.safetensors")
    torch.manual_seed(5)
    save_file({"emb_params": torch.randn(2, 32)}, folder / "mystyle.safetensors")  # two vectors, A1111's layout
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "name": "oldstyle"}, folder / "oldstyle.pt")
    save_file({"emb_params": torch.randn(1, 96)}, folder / "wide.safetensors")  # for a 96-wide text encoder
    return folder


def made(sdrun, *args) -> np.ndarray:
    result = sdrun(*args, *RUN, "-o", "out.png", "--overwrite")
    assert result.exit_code == 0, result
    return pixels("out.png")


@pytest.mark.parametrize("name", ["ink", "chalk"])  # kohya/A1111 layout, diffusers layout
def test_lora_weight_zero_is_the_base_image_one_differs_and_fused_equals_unfused(sdrun, adapter_files, name):
    lora = adapter_files / f"{name}.safetensors"
    base = made(sdrun, "a fox")
    assert np.array_equal(made(sdrun, "a fox", "--lora", f"{lora}:0"), base)
    fused = made(sdrun, "a fox", "--lora", lora)
    assert np.abs(fused - base).max() > 0.05
    # two prompts with different LoRA weights: one model for both, so the LoRA stays unfused
    Path("p.jsonl").write_text(json.dumps({"prompt": f"a fox <lora:{name}:1>", "output": "unfused.png"}) + "\n"
                               + json.dumps({"prompt": "a fox", "output": "plain.png"}) + "\n")
    result = sdrun("--prompt-file", "p.jsonl", *RUN, "--lora-dir", adapter_files)
    assert result.exit_code == 0, result
    unfused, plain = result.stdout.split()
    assert np.abs(pixels(unfused) - fused).max() <= 1 / 255 + 1e-6
    assert np.array_equal(pixels(plain), base)


def test_prompt_tag_needs_a_known_lora_and_bad_files_are_one_line_errors(sdrun, adapter_files):
    cases = [
        (("a fox <lora:ink:0.5>",), 2, "add --lora-dir DIR"),
        (("a fox <lora:nothere>", "--lora-dir", adapter_files), 2, "no such file"),
        (("a fox", "--lora", "missing.safetensors"), 2, "--lora missing.safetensors: no such file"),
        (("a fox", "--lora", adapter_files / "checkpoint.safetensors"), 1, "holds no LoRA weights"),
        (("a fox", "--lora", adapter_files / "xl.safetensors"), 2, f"the LoRA {adapter_files / 'xl.safetensors'} is "
         "for another model family (its cross-attention reads 96-wide text states), but this model is tiny "
         "(32-wide): give a LoRA trained for tiny models, or a model of the LoRA's family with --model"),
        (("a fox", "--lora", adapter_files / "xl-te2.safetensors"), 2, "is for SDXL (it changes a second text encoder)"),
        (("a fox", "--lora", adapter_files / "xl.pt"), 1, "is not a LoRA for this tiny model"),
        (("a fox", "--embedding", adapter_files / "wide.safetensors"), 1, "is not a textual-inversion embedding"),
        (("a fox", "--embedding", "nothere.pt"), 2, "no such file"),
    ]
    for args, code, message in cases:
        result = sdrun(*args, *RUN, "-o", "never.png")
        assert result.exit_code == code and message in result.stderr, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not Path("never.png").exists()
    result = sdrun("plan", "a fox", *RUN, "--lora", adapter_files / "xl.safetensors")  # plan loads no weights
    assert result.exit_code == 2 and "is for another model family" in result.stderr, result


@pytest.mark.parametrize("key", ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                                 "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight",
                                 "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
                                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v.lora_down.weight"])
def test_lora_family_is_read_from_the_cross_attention_width_in_every_layout(key, tmp_path):
    from sdrun import lora_file
    from sdrun.errors import UsageError

    save_file({key: torch.zeros(4, 2048)}, tmp_path / "l.safetensors")
    lora_file.check(tmp_path / "l.safetensors", lora_file.Target("sdxl", 2048))
    with pytest.raises(UsageError, match="the LoRA .* is for SDXL .* but this model is SD 1.x "):
        lora_file.check(tmp_path / "l.safetensors", lora_file.Target("sd1", 768))


def test_embedding_token_changes_the_image_and_an_unknown_token_does_not_crash(sdrun, adapter_files):
    for token in ("mystyle", "oldstyle"):  # a two-vector .safetensors, a one-vector A1111 .pt
        plain = made(sdrun, f"a fox, {token}")
        styled = made(sdrun, f"a fox, {token}", "--embedding-dir", adapter_files)
        assert np.abs(styled - plain).max() > 0.01, token
        assert [e["token"] for e in meta("out.png")["embeddings"]] == [token]  # only what the prompt uses
    made(sdrun, "a fox, <not-an-embedding>", "--embedding", adapter_files / "mystyle.safetensors")
    assert meta("out.png")["embeddings"] == []


def test_hashes_are_a1111s_and_round_trip_through_replay(sdrun, adapter_files):
    lora, embedding = adapter_files / "ink.safetensors", adapter_files / "mystyle.safetensors"
    made(sdrun, "a fox <lora:ink:0.7>, mystyle", "--lora-dir", adapter_files, "--embedding", embedding)
    Path("out.png").rename("orig.png")
    data = lora.read_bytes()
    data_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    file_hash = hashlib.sha256(embedding.read_bytes()).hexdigest()[:10]
    recorded = meta("orig.png")
    entries = [(e["name"], e["weight"], e["applied"], e["hash"]) for e in recorded["loras"]]
    assert entries == [("ink", None, 0.7, data_hash)]
    assert recorded["embeddings"][0]["hash"] == file_hash
    from PIL import Image, PngImagePlugin
    with Image.open("orig.png") as image:
        parameters = image.text["parameters"]
    assert f'Lora hashes: "ink: {data_hash}"' in parameters and f'TI hashes: "mystyle: {file_hash}"' in parameters
    result = sdrun("replay", "orig.png")
    assert result.exit_code == 0, result
    assert np.array_equal(pixels("orig-replay.png"), pixels("orig.png"))
    assert meta("orig-replay.png")["loras"] == recorded["loras"]
    for damaged in ({"loras": [{"name": "ink", "path": 3, "weight": None}]}, {"embeddings": "mystyle"},
                    {"ip_adapter": {"path": "x"}}):
        info = PngImagePlugin.PngInfo()
        info.add_text("sdrun", json.dumps({**recorded, **damaged}))
        Image.open("orig.png").save("damaged.png", pnginfo=info)
        result = sdrun("replay", "damaged.png", "--overwrite")
        assert result.exit_code == 2 and "has a damaged" in result.stderr, (damaged, result)


def test_hashes_are_cached_per_path_size_and_mtime(tmp_path):
    model = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(3)}, model)
    first = hashes.model_hash(str(model))
    assert first == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    cache = json.loads(hashes.cache_file().read_text())
    for entry in cache.values():
        entry["sha256"] = "f" * 64  # a cached value is believed while the file's size and mtime are unchanged
    hashes.cache_file().write_text(json.dumps(cache))
    assert hashes.model_hash(str(model)) == "f" * 10
    save_file({"x": torch.ones(3)}, model)  # rewritten: size or mtime changes, hashed again
    assert hashes.model_hash(str(model)) == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert hashes.model_hash("tiny") is None


def test_skip_existing_keeps_only_an_image_made_with_the_same_loras(sdrun, adapter_files):
    lora = adapter_files / "ink.safetensors"
    assert sdrun("a fox", *RUN, "--lora", f"{lora}:0.5", "-o", "fox.png").exit_code == 0
    assert sdrun("a fox", *RUN, "--lora", f"{lora}:0.5", "-o", "fox.png", "--skip-existing").exit_code == 0
    result = sdrun("a fox", *RUN, "--lora", f"{lora}:0.9", "-o", "fox.png", "--skip-existing")
    assert result.exit_code == 1 and "its loras is" in result.stderr, result


def test_ip_adapter_loads_in_the_real_layout_and_its_image_steers(sdrun, adapter_files, tmp_path):
    from PIL import Image

    adapter = write_ip_adapter(tmp_path, models.build_tiny().unet)
    Image.new("RGB", (40, 40), (200, 30, 30)).save("red.png")
    Image.new("RGB", (40, 40), (30, 30, 200)).save("blue.png")
    base = made(sdrun, "a fox")
    red = made(sdrun, "a fox", "--ip-adapter", adapter, "--ip-image", "red.png")
    assert np.abs(red - base).max() > 0.01
    assert meta("out.png")["ip_adapter"]["scale"] == 1.0
    Path("out.png").rename("red-orig.png")
    assert not np.array_equal(made(sdrun, "a fox", "--ip-adapter", adapter, "--ip-image", "blue.png"), red)
    assert np.array_equal(made(sdrun, "a fox", "--ip-adapter", adapter, "--ip-image", "red.png",
                               "--ip-scale", "0"), base)
    result = sdrun("replay", "red-orig.png")
    assert result.exit_code == 0 and np.array_equal(pixels("red-orig-replay.png"), red), result
    Path("not-an-image.png").write_text("text")
    for args, message in [(("--ip-image", "red.png"), "--ip-image needs --ip-adapter"),
                          (("--ip-adapter", adapter), "needs --ip-image"),
                          (("--ip-adapter", adapter, "--ip-image", "not-an-image.png"), "not a readable image"),
                          (("--ip-adapter", adapter_files / "ink.safetensors", "--ip-image", "red.png"),
                           "image encoder is not at")]:
        result = sdrun("a fox", *RUN, *args, "-o", "never.png")
        assert result.exit_code == 2 and message in result.stderr, (args, result)
    result = sdrun("a fox", *RUN, "--ip-adapter", adapter_files / "ink.safetensors", "--ip-image", "red.png",
                   "--ip-image-encoder", tmp_path / "image_encoder", "-o", "never.png")
    assert result.exit_code == 1 and "is not an IP-Adapter for this tiny model" in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1
    assert not Path("never.png").exists()


def test_fp8_storage_runs_with_an_unfused_lora(sdrun, adapter_files):
    """PEFT casts a LoRA layer's input to its weights' dtype: those small layers must not be stored in fp8."""
    lines = [{"prompt": "a fox <lora:ink:1>", "output": "lora.png"}, {"prompt": "a fox", "output": "plain.png"}]
    Path("p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    plain = sdrun("--prompt-file", "p.jsonl", *RUN, "--lora-dir", adapter_files, "-o", "full/")
    stored = sdrun("--prompt-file", "p.jsonl", *RUN, "--lora-dir", adapter_files, "--fp8", "-o", "fp8/")
    assert plain.exit_code == 0 and stored.exit_code == 0, stored
    for full, fp8 in zip(plain.stdout.split(), stored.stdout.split()):
        assert np.abs(pixels(full) - pixels(fp8)).mean() < 0.02
