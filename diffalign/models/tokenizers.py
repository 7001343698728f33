"""Locally written tokenizers for tiny pipelines: no hub download needed.

`write_clip_tokenizer` writes a CLIP byte-level BPE (vocab.json + merges.txt) where each given word is ONE token and any
other text falls back to single characters. `write_t5_tokenizer` writes a T5 (Unigram, sentencepiece-style)
tokenizer.json.
Both folders load with the stock `from_pretrained` of the tokenizer class, exactly as a real checkpoint does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def split_words(texts: Iterable[str]) -> list[str]:
    """Lower-cased alphabetic words of `texts`, unique, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[a-z]+", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 77) -> Path:
    """Write a CLIP BPE tokenizer to `folder` in which every word of `words` is a single token.

    Merges are added word by word, each joining the pieces that the merges so far leave, so that a later word can never
    split an earlier one (a naive char-pair merge list makes e.g. "green" tokenise through "red"'s merges).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + END_OF_WORD for c in byte_chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in split_words(words):
        pieces = _apply_bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(ranks)
            vocab.append(pair[0] + pair[1])
            pieces[:2] = [pair[0] + pair[1]]
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges = ["#version: 0.2"] + [f"{a} {b}" for a, b in sorted(ranks, key=ranks.get)]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_t5_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 512) -> Path:
    """Write a T5 (Unigram) tokenizer to `folder`: each word of `words` one piece, single letters as fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in split_words(words)]
    pieces += [(c, -10.0) for c in "▁abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace()
    t5 = T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    folder = Path(folder)
    t5.save_pretrained(folder)
    return folder
