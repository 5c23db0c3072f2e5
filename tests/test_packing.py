"""Linear layers that read the same input packed into one GEMM (ops/packing.py): the attention processor's q, k and
v, and the fused ResNet blocks' time-embedding projections. CPU: the same outputs as layer by layer, the GEMMs
counted, and the fallback to layer by layer once a layer has a tensor of its own, a hook or a LoRA layer around it.
The kernel's reading of packed q, k, v (strided views) is tests/test_attention_op.py's test_strided_inputs."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from sd_layout import tiny_unet, tiny_unet_inputs
from sdrun.ops import norms, packing, processor
from sdrun.ops.processor import SdrunAttnProcessor
from sdrun.ops.reference import reference_attention


@pytest.fixture
def gemms(monkeypatch):
    """The weight shapes of every F.linear call (nn.Linear's included), in order."""
    shapes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: shapes.append(w.shape) or linear(x, w, b))
    return shapes


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linears_compute_what_each_computes(bias):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, n, bias=bias) for n in (8, 24, 8)]
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        keys = [set(layer.state_dict()) for layer in layers]
        assert packing.packed(layers) is None  # three tensors of their own
        assert packing.pack_linears(layers)
        weight, joined_bias = packing.packed(layers)
        assert weight.shape == (40, 16) and (joined_bias is None) != bias
        together = torch.nn.functional.linear(x, weight, joined_bias).split([8, 24, 8], dim=-1)
        alone = [layer(x) for layer in layers]
    for a, b, c in zip(together, alone, expected):
        torch.testing.assert_close(a, c)
        assert torch.equal(b, c)
    assert [set(layer.state_dict()) for layer in layers] == keys
    layers[1].weight.data = layers[1].weight.data.clone()  # a tensor of its own again
    assert packing.packed(layers) is None
    assert not packing.pack_linears([torch.nn.Linear(16, 8), torch.nn.Linear(12, 8)])  # other input widths


def test_packed_projections_are_one_gemm_with_the_same_result(monkeypatch, gemms):
    """The processor projects q, k, v (k, v of a cross-attention) with one GEMM and computes what it computed layer
    by layer; a layer given a tensor of its own or a hook takes its module back to layer by layer."""
    monkeypatch.setattr(processor, "memory_efficient_attention", reference_attention)  # no kernel on the CPU
    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    unet.set_attn_processor(SdrunAttnProcessor(torch.float32))  # on the CPU, install() would leave them on SDPA
    modules = [m for m in unet.modules() if isinstance(m, Attention)]
    saved = lambda ms: sum(1 if m.is_cross_attention else 2 for m in ms)  # noqa: E731
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        layer_by_layer = len(gemms)
        assert processor.pack_projections(unet) == len(modules)
        gemms.clear()
        got = unet(sample, 500, context).sample
        assert len(gemms) == layer_by_layer - saved(modules)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        modules[0].to_v.weight.data = modules[0].to_v.weight.data.clone()
        modules[1].to_k.register_forward_hook(lambda *args: None)
        gemms.clear()
        again = unet(sample, 500, context).sample
    assert len(gemms) == layer_by_layer - saved(modules[2:])
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_packed_time_projections_are_one_gemm_a_forward(gemms):
    """The fused ResNet blocks' time-embedding projections: one GEMM (and one SiLU) a forward for all of them, the
    same output; a LoRA layer around one block's projection takes that block back to its own GEMM."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    norms.install_fused_norms(unet)
    blocks = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        layer_by_layer = len(gemms)
        assert norms.pack_time_projections(unet) == len(blocks) > 1
        gemms.clear()
        got = unet(sample, 500, context).sample
        assert len(gemms) == layer_by_layer - (len(blocks) - 1)
        assert (sum(b.time_emb_proj.out_features for b in blocks), blocks[0].time_emb_proj.in_features) in gemms
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["down_blocks.0.resnets.0.time_emb_proj"],
                                           init_lora_weights=False), unet)
        with_lora = unet(sample, 500, context).sample
        for block in blocks:
            vars(block).pop("sdrun_time_projection")
        expected_lora = unet(sample, 500, context).sample  # every block alone
    assert (with_lora - expected).abs().max() > 1e-4  # the LoRA counted
    torch.testing.assert_close(with_lora, expected_lora, rtol=1e-5, atol=1e-5)


def test_backends_placed_step_runs_once_the_model_is_loaded_and_xformers_packs_there(monkeypatch):
    """pipeline.load calls each backend's `placed` after `apply` and placement, and shows its note; --xformers'
    packs the attention projections and, in the blocks its norms rewired, the time projections."""
    from dataclasses import replace

    from sdrun import pipeline
    from sdrun.backends import xformers
    from sdrun.backends.base import Backend
    from sdrun.config import Job, RunConfig
    from sdrun.console import Reporter

    calls, notes = [], []

    def apply(pipe, device):
        norms.install_fused_norms(pipe.unet)  # what --xformers' apply does to the blocks (no kernel here)
        calls.append("apply")

    def placed(pipe):
        calls.append("placed")
        return xformers.placed(pipe)

    probe = Backend(name="probe", brief="", help="", apply=apply, placed=placed)
    monkeypatch.setattr(Reporter, "note", lambda self, line: notes.append(line))
    planned = pipeline.plan_run(RunConfig(model="tiny"), [Job(prompt="a fox", steps=2, width=64, height=64)])
    engine = pipeline.load(planned.run, Reporter(quiet=True), replace(planned.setup, chosen=(probe,)))
    assert calls == ["apply", "placed"]
    attention = sum(isinstance(m, Attention) for m in engine.pipe.unet.modules())
    blocks = sum(type(m).__name__ == "ResnetBlock2D" for m in engine.pipe.unet.modules())
    assert f"{attention} attention modules project their inputs with one GEMM, {blocks} ResNet blocks" in notes[-1]


def test_the_time_projection_gemm_adds_every_conv1_bias(monkeypatch):
    """While every fused block's conv1 runs bare, the packed GEMM's bias carries the conv1 biases too: norm2 gets a
    column slice of its output, with no addition of its own; a LoRA layer around one conv1 makes each block add its
    own bias again. Either way the output is diffusers'."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = tiny_unet()
    sample, context = tiny_unet_inputs(unet, "cpu", torch.float32)
    norms.install_fused_norms(unet)
    blocks = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    added = []
    group_norm = norms.group_norm
    monkeypatch.setattr(norms, "group_norm", lambda *args: added.append(args[6]) or group_norm(*args))
    with torch.no_grad():
        expected = unet(sample, 500, context).sample
        assert norms.pack_time_projections(unet) == len(blocks)
        shared = blocks[0].sdrun_time_projection
        added.clear()
        got = unet(sample, 500, context).sample
        assert shared.adds_conv1_biases
        slices = [a for a in added if a is not None]
        assert len(slices) == len(blocks)
        assert all(a._base is shared.projected for a in slices)  # views of the one GEMM's output
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["down_blocks.0.resnets.0.conv1"],
                                           init_lora_weights=False), unet)
        with_lora = unet(sample, 500, context).sample
        assert not shared.adds_conv1_biases
        for block in blocks:
            vars(block).pop("sdrun_time_projection")
        expected_lora = unet(sample, 500, context).sample  # every block alone
    assert (with_lora - expected).abs().max() > 1e-4  # the LoRA counted
    torch.testing.assert_close(with_lora, expected_lora, rtol=1e-5, atol=1e-5)
