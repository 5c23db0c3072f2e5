"""Prompts of any length and A1111 emphasis (sdrun/render/prompts.py): the parser, the exact equality with
diffusers' encode_prompt for plain short prompts (SD and SDXL), chunking, weights, and the truncation warning."""

import numpy as np
import pytest
import torch
from conftest import TINY, pixels
from sd_layout import tiny_sdxl

from sdrun import models
from sdrun.render import prompts


@pytest.fixture(scope="module")
def tiny_pipe():
    return models.build_tiny()


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny_sdxl()


WORDS = "a red fox in a snowy forest at dawn, oil painting, soft light, detailed fur"


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat:1.5) sits", [("a ", 1.0), ("cat", 1.5), (" sits", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("[cat]", [("cat", pytest.approx(1 / 1.1))]),
    ("((cat))", [("cat", pytest.approx(1.21))]),
    ("(a [b]:2)", [("a ", 2.0), ("b", pytest.approx(2 / 1.1))]),
    (r"\(cat\) photo: x", [("(cat) photo: x", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(cat", [("cat", 1.1)]),
    ("", [("", 1.0)]),
])
def test_parse_follows_a1111_emphasis(text, expected):
    assert prompts.parse(text) == expected


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_plain_short_prompt_is_diffusers_own_conditioning(tiny_pipe, sdxl_pipe, negative):
    with torch.no_grad():
        embeds, negative_embeds = tiny_pipe.encode_prompt(WORDS, "cpu", 1, True, negative or None)
        ours = prompts.encode(tiny_pipe, "sd1", WORDS, negative, True)
        assert torch.equal(ours.embeds, embeds) and torch.equal(ours.negative, negative_embeds)
        xl = sdxl_pipe.encode_prompt(prompt=WORDS, device="cpu", do_classifier_free_guidance=True,
                                     negative_prompt=negative or None)
        ours = prompts.encode(sdxl_pipe, "sdxl", WORDS, negative, True)
    for mine, theirs in zip((ours.embeds, ours.negative, ours.pooled, ours.negative_pooled), xl):
        assert torch.equal(mine, theirs)


def test_long_prompt_is_chunked_for_both_sdxl_encoders_and_weights_change_it(sdxl_pipe, tiny_pipe):
    long = ", ".join([WORDS] * 20)  # about 300 tokens
    ours = prompts.encode(sdxl_pipe, "sdxl", long, "short", True)
    length = ours.embeds.shape[1]
    assert length == ours.negative.shape[1] and length % 77 == 0 and length >= 4 * 77 and not ours.dropped
    assert ours.embeds.shape[2] == 32 + 64
    plain = prompts.encode(tiny_pipe, "sd1", "a red fox", "", False).embeds
    emphasised = prompts.encode(tiny_pipe, "sd1", "a red (fox:1.5)", "", False).embeds
    assert plain.shape == emphasised.shape and not torch.equal(plain, emphasised)
    assert prompts.encode(tiny_pipe, "sd1", "a red BREAK fox", "", False).embeds.shape[1] == 2 * 77


def test_chunk_ends_at_a_recent_comma():
    tokenizer = models.tokenizer()
    chunks = prompts.tokenize(None, tokenizer, "word " * 70 + ", " + "word " * 10)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    assert chunks.ids[0, 71] == comma and chunks.ids[0, 72] == tokenizer.eos_token_id
    assert (chunks.ids[1, 1:11] != comma).all() and chunks.ids[1, 11] == tokenizer.eos_token_id


def test_300_token_prompt_is_not_truncated_and_only_a_real_truncation_warns(sdrun):
    head = ", ".join([WORDS] * 6)  # past the first 77 tokens
    images = []
    for tail in ("a blue whale", "a green castle"):
        result = sdrun(f"{head}, {tail}, " + ", ".join([WORDS] * 14), *TINY, "--seed", "1", "-o", f"{tail}.png")
        assert result.exit_code == 0, result
        assert "warning" not in result.stderr
        images.append(pixels(f"{tail}.png"))
    assert not np.array_equal(*images)  # the words past token 77 reach the image
    huge = " ".join(["fox"] * (prompts.MAX_CHUNKS * prompts.CHUNK + 5)) + " zebra"
    result = sdrun(huge, *TINY, "--steps", "1", "--guidance", "1", "-o", "huge.png")
    assert result.exit_code == 0, result
    assert result.stderr.count("warning: the prompt is longer than 2400 tokens") == 1
    assert "zebra" in result.stderr
