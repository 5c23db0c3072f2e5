"""Write the Stable Diffusion CLIP tokenizer files (vocab.json, merges.txt) from OpenAI's CLIP BPE file.

Every SD family uses the same BPE vocabulary: SD 1.x's tokenizer, SD 2.x's, and both of SDXL's differ only in the
pad token, which the loader passes (`pad_token="!"` for OpenCLIP-trained encoders). The files on the Hub are a
mechanical rewrite of OpenAI's MIT-licensed `bpe_simple_vocab_16e6.txt.gz` (1,356,917 bytes, sha256 below), which
the open-clip-torch wheel carries; this script is that rewrite, following `clip/simple_tokenizer.py`:

- merges.txt: a version header, then lines 1 .. 48894 of the BPE file (line 0 is its own header). 48894 is
  49152 - 256 - 2: the vocabulary is capped at 49408 = 2*256 + 48894 + 2 entries.
- vocab.json, ids in this order: the 256 GPT-2 byte-to-unicode characters; the same 256 with "</w>" (end of word);
  one token per merge (the two halves joined); "<|startoftext|>" (49406) and "<|endoftext|>" (49407).

Usage: python configs/tokenizer/derive.py [PATH/TO/bpe_simple_vocab_16e6.txt.gz]   (default /tmp/bpe.txt.gz)
Check: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407] (tests/test_models.py).
"""

import gzip
import hashlib
import json
import sys
from pathlib import Path

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in GPT-2's order (printable bytes first, then the rest)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    byte_order = printable + [b for b in range(256) if b not in printable]
    for b in byte_order:
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def derive(bpe_gz: Path, out_dir: Path) -> None:
    raw = bpe_gz.read_bytes()
    if hashlib.sha256(raw).hexdigest() != BPE_SHA256:
        sys.exit(f"{bpe_gz} is not OpenAI's bpe_simple_vocab_16e6.txt.gz (sha256 differs): use open-clip-torch's copy")
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    byte_chars = bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    derive(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bpe.txt.gz"), Path(__file__).parent)
