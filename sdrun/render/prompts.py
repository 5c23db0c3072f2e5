"""Prompt text -> CLIP conditioning the way A1111 does it: any length, in chunks of 75 tokens, with emphasis.

Syntax (A1111's): `(word)` weighs x1.1, `[word]` x1/1.1, `(word:1.5)` x1.5, nesting multiplies, `\\(` is a literal
bracket, `BREAK` starts a new chunk. Each chunk is encoded alone (BOS + 75 tokens + EOS = CLIP's 77 positions) and
the chunks are concatenated along the token axis; SDXL does so for both of its text encoders, and its pooled
embedding is the first chunk's. A chunk with weights is scaled token by token and then brought back to its
original mean, as A1111 does. A plain prompt that fits in 77 tokens gives exactly diffusers' own conditioning.

No library does this: compel has a syntax of its own (`word++`, `(word)1.2`) and pads differently, and sd_embed
is not packaged; the grammar below is small.
"""

import re
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import get_module_execution_device

CHUNK = 75  # tokens per chunk, between CLIP's BOS and EOS
MAX_CHUNKS = 32  # 2400 tokens: past that the text is dropped (with a warning); 32x the cross-attention keys of SD
COMMA_BACKTRACK = 20  # a chunk that fills up within this many tokens of a comma ends at the comma (A1111's default)
EMPHASIS = 1.1

_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:|\\", re.S)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class Chunks:
    """One text tokenized into 77-token rows for one text encoder."""

    ids: torch.Tensor  # (chunks, 77) long
    weights: torch.Tensor  # (chunks, 77) float; 1 on BOS, EOS and padding
    dropped: str = ""  # the text past MAX_CHUNKS, decoded; "" when nothing was dropped


def parse(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis syntax -> [(text, weight)], runs of one weight merged; BREAK is ("BREAK", -1)."""
    pieces: list[list] = []  # [text, weight]
    round_opened, square_opened = [], []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_opened.append(len(pieces))
        elif token == "[":
            square_opened.append(len(pieces))
        elif weight is not None and round_opened:
            scale(round_opened.pop(), float(weight))
        elif token == ")" and round_opened:
            scale(round_opened.pop(), EMPHASIS)
        elif token == "]" and square_opened:
            scale(square_opened.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in round_opened:  # an unclosed bracket weighs to the end, as in A1111
        scale(start, EMPHASIS)
    for start in square_opened:
        scale(start, 1 / EMPHASIS)
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1] and piece[1] != -1:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def tokenize(pipe, tokenizer, text: str) -> Chunks:
    """`text` as rows of BOS + 75 tokens + EOS + padding, with each token's weight."""
    rows: list[tuple[list[int], list[float]]] = []
    tokens, weights, last_comma = [], [], -1
    comma = tokenizer.convert_tokens_to_ids(",</w>")

    def close(keep: int) -> None:
        nonlocal tokens, weights, last_comma
        rows.append((tokens[:keep], weights[:keep]))
        tokens, weights, last_comma = tokens[keep:], weights[keep:], -1

    for fragment, weight in parse(text):
        if weight == -1:  # BREAK
            close(len(tokens))
            continue
        if hasattr(pipe, "maybe_convert_prompt"):  # a multi-vector embedding's token -> its vector tokens
            fragment = pipe.maybe_convert_prompt(fragment, tokenizer)
        for token in tokenizer(fragment, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            tokens.append(token)
            weights.append(weight)
            if len(tokens) == CHUNK:
                backtrack = last_comma >= 0 and CHUNK - 1 - last_comma <= COMMA_BACKTRACK
                close(last_comma + 1 if backtrack else CHUNK)
    if tokens or not rows:
        close(len(tokens))
    kept, dropped = rows[:MAX_CHUNKS], [token for row, _ in rows[MAX_CHUNKS:] for token in row]
    pad = tokenizer.pad_token_id
    ids = [[tokenizer.bos_token_id, *row, tokenizer.eos_token_id] + [pad] * (CHUNK - len(row)) for row, _ in kept]
    rows_weights = [[1.0, *w, 1.0] + [1.0] * (CHUNK - len(w)) for _, w in kept]
    return Chunks(torch.tensor(ids), torch.tensor(rows_weights), tokenizer.decode(dropped) if dropped else "")


def pad_to(chunks: Chunks, count: int, empty: Chunks) -> Chunks:
    """More rows of the empty prompt, so that prompt and negative prompt have one length (CFG stacks them)."""
    extra = count - len(chunks.ids)
    if extra <= 0:
        return chunks
    return Chunks(torch.cat([chunks.ids, empty.ids.repeat(extra, 1)]),
                  torch.cat([chunks.weights, empty.weights.repeat(extra, 1)]), chunks.dropped)


def weighted(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(chunks, 77, D) scaled by each token's weight, each chunk restored to its mean; untouched if all are 1."""
    if bool((weights == 1).all()):
        return embeds
    weights = weights.to(embeds.device, embeds.dtype)[..., None]
    before = embeds.mean(dim=(1, 2), keepdim=True)
    scaled = embeds * weights
    return scaled * (before / scaled.mean(dim=(1, 2), keepdim=True))


def encode_sd(pipe, chunks: Chunks) -> torch.Tensor:
    """SD 1.x/2.x: the text encoder's last layer (as diffusers' encode_prompt), (1, 77 * chunks, D)."""
    encoder = pipe.text_encoder
    embeds = encoder(chunks.ids.to(get_module_execution_device(encoder)))[0]
    return weighted(embeds, chunks.weights).reshape(1, -1, embeds.shape[-1])


def encode_sdxl(pipe, chunks: tuple[Chunks, Chunks]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: both encoders' penultimate layers side by side, and the second one's pooled embedding of chunk 1."""
    hidden, pooled = [], None
    for encoder, rows in zip((pipe.text_encoder, pipe.text_encoder_2), chunks):
        out = encoder(rows.ids.to(get_module_execution_device(encoder)), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0][:1]
        hidden.append(out.hidden_states[-2])
    embeds = weighted(torch.cat(hidden, dim=-1), chunks[1].weights)
    return embeds.reshape(1, -1, embeds.shape[-1]), pooled


@dataclass
class Encoded:
    """A prompt and its negative, encoded to one length; pooled embeddings for SDXL only."""

    embeds: torch.Tensor
    negative: torch.Tensor | None  # None without guidance
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    dropped: str = ""  # text of the prompt or negative prompt past MAX_CHUNKS


def encode(pipe, family: str, prompt: str, negative_prompt: str, guidance: bool) -> Encoded:
    """Both prompts through every text encoder; SDXL's empty negative is zeros (force_zeros_for_empty_prompt)."""
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2) if family == "sdxl" else (pipe.tokenizer,)
    zero_negative = family == "sdxl" and not negative_prompt and pipe.config.force_zeros_for_empty_prompt
    texts = (prompt,) + ((negative_prompt,) if guidance and not zero_negative else ())
    rows = [[tokenize(pipe, tokenizer, text) for tokenizer in tokenizers] for text in texts]
    count = max(len(chunks.ids) for per_text in rows for chunks in per_text)
    empties = [tokenize(pipe, tokenizer, "") for tokenizer in tokenizers]
    rows = [[pad_to(chunks, count, empty) for chunks, empty in zip(per_text, empties)] for per_text in rows]
    dropped = " / ".join(dict.fromkeys(c.dropped for per_text in rows for c in per_text if c.dropped))
    with torch.no_grad():
        if family != "sdxl":
            embeds = [encode_sd(pipe, per_text[0]) for per_text in rows]
            return Encoded(embeds[0], embeds[1] if guidance else None, dropped=dropped)
        encoded = [encode_sdxl(pipe, per_text) for per_text in rows]
    (embeds, pooled), negative = encoded[0], encoded[1:]
    if guidance and zero_negative:
        negative = [(torch.zeros_like(embeds), torch.zeros_like(pooled))]
    negative_embeds, negative_pooled = negative[0] if guidance else (None, None)
    return Encoded(embeds, negative_embeds, pooled, negative_pooled, dropped)
