"""CLIP byte-level BPE tokenizer, identical in output to open_clip's ``SimpleTokenizer`` / ``tokenize``.

Text is cleaned (``ftfy``, HTML unescaped twice, whitespace runs collapsed, lowercased), split with a Unicode-aware
pattern (letters runs, single digits, punctuation runs, English contractions, and the two literal special-token
strings), each piece is mapped byte-by-byte to printable characters and merged by BPE rank.  A batch is encoded as
``[start] + ids + [end]``, truncated to ``context_length`` with the end token kept last, and padded with 0.

Shape letters: N = number of texts, L = context length (77).
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import cache, lru_cache
from importlib.resources import files

import ftfy
import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # merges used from the file (lines 2 ... 48895)
START_TOKEN, END_TOKEN = "<start_of_text>", "<end_of_text>"
PAD_ID = 0

_SPLIT = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_WHITESPACE = regex.compile(r"\s+")


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (no whitespace/control chars)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def clean_text(text: str) -> str:
    """``ftfy`` fix, double HTML unescape, collapse whitespace runs, strip, lowercase (open_clip's cleaning)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class Tokenizer:
    """open_clip-compatible CLIP tokenizer over the shipped 49,408-entry vocabulary."""

    def __init__(self) -> None:
        lines = gzip.decompress(files("dynamicrafter").joinpath("data", VOCAB_FILE).read_bytes()).decode("utf-8")
        merges = [tuple(line.split()) for line in lines.split("\n")[1 : NUM_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(pair) for pair in merges]
        vocab += [START_TOKEN, END_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        """Merge the characters of one byte-encoded piece (last one suffixed ``</w>``) by lowest rank first."""
        if piece in (START_TOKEN, END_TOKEN):
            return (piece,)
        word = (*piece[:-1], piece[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without the start/end tokens."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(piece))
        return ids

    def num_tokens(self, text: str) -> int:
        """Length of ``[start] + ids + [end]`` before truncation."""
        return len(self.encode(text)) + 2

    def is_truncated(self, text: str, context_length: int = 77) -> bool:
        """Whether ``text`` loses tokens when encoded into ``context_length`` positions."""
        return self.num_tokens(text) > context_length

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        """Token ids (N, L) int64: start, ids, end (kept last when truncating), zero padding."""
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        result = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > context_length:
                ids = ids[: context_length - 1] + [self.end_id]
            result[row, : len(ids)] = torch.tensor(ids)
        return result


@cache
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer (vocabulary loaded on first use)."""
    return Tokenizer()
