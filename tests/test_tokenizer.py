"""Tokenizer: the fixtures' ``token_ids``, the spec's examples, cleaning rules, truncation, and a cross-check against
transformers' ``CLIPTokenizer`` built offline from the same BPE file."""

from __future__ import annotations

import gzip
import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynamicrafter.tokenizer import NUM_MERGES, Tokenizer, clean_text, get_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SCENARIOS = ["i2v_256_style", "i2v_512_style", "interp_512_style", "i2v_512_fullres"]
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fixture_token_ids(tok: Tokenizer, scenario: str) -> None:
    inputs = json.loads((FIXTURES / scenario / "scenario.json").read_text())["inputs"]
    expected = load_file(FIXTURES / scenario / "expected.safetensors")["token_ids"]
    got = tok([inputs["prompt"], inputs["uncond_prompt"]])
    assert got.dtype == torch.int64 and got.shape == (2, 77)
    assert torch.equal(got, expected)


def test_spec_examples(tok: Tokenizer) -> None:
    assert tok("").tolist() == [[SOT, EOT] + [0] * 75]
    ids = [SOT, 320, 786, 26545, 787, 3500, 267, 5438, 575, EOT]
    assert tok("a man waving his hands, sunny day")[0].tolist() == ids + [0] * 67
    assert tok.encode("a man waving his hands, sunny day") == ids[1:-1]
    assert tok.num_tokens("a man waving his hands, sunny day") == 10
    assert tok.num_tokens("") == 2 and not tok.is_truncated("")


def test_vocabulary_layout(tok: Tokenizer) -> None:
    assert len(tok.encoder) == 49408
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256
    assert tok.encoder["<start_of_text>"] == SOT and tok.encoder["<end_of_text>"] == EOT


def test_cached_and_lazy() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_cleaning_rules(tok: Tokenizer) -> None:
    # case, whitespace runs, double HTML unescape
    assert tok.encode("A MAN") == tok.encode("a man")
    assert tok.encode("  a \t\n man   waving\u3000 ") == tok.encode("a man waving")
    assert clean_text("fish &amp;amp; chips") == "fish & chips"
    assert tok.encode("fish &amp;amp; chips") == tok.encode("fish & chips")
    assert tok.encode("&lt;b&gt;") == tok.encode("<b>")
    # digits are split one by one: "2024" -> four pieces, each a single "d</w>" token
    assert tok.encode("2024") == [tok.encoder[d + "</w>"] for d in "2024"]
    # ftfy folds full-width characters and expands Latin ligatures, and fixes mojibake
    assert tok.encode("ＡＢＣ") == tok.encode("abc")
    assert tok.encode("ﬁsh") == tok.encode("fish")
    assert clean_text("cafÃ©") == "café"
    # accents, CJK and emoji go through the byte-level vocabulary (ids also checked against transformers below)
    assert tok.encode("café") == [15304]
    assert tok.encode("東京 🐱") == [48338, 21078, 361, 22979]


def test_literal_special_tokens(tok: Tokenizer) -> None:
    assert tok.encode("<start_of_text>") == [SOT]
    assert tok.encode("hello <end_of_text> world") == [tok.encoder["hello</w>"], EOT, tok.encoder["world</w>"]]
    assert tok.encode("<END_OF_TEXT>") == [EOT]  # lowercased before splitting
    assert EOT not in tok.encode("<|endoftext|>")  # transformers' spelling is ordinary text here


def test_truncation(tok: Tokenizer) -> None:
    prompt = " ".join(["castle"] * 100)
    ids = tok(prompt)[0]
    assert tok.num_tokens(prompt) == 102 and tok.is_truncated(prompt)
    assert ids[0] == SOT and ids[76] == EOT and (ids[1:76] == tok.encoder["castle</w>"]).all()
    assert not tok.is_truncated(" ".join(["castle"] * 75)) and tok.is_truncated(" ".join(["castle"] * 76))
    assert tok(prompt, context_length=5)[0].tolist() == [SOT] + [tok.encoder["castle</w>"]] * 3 + [EOT]
    assert tok([prompt, "", "a"]).shape == (3, 77)
    with pytest.raises(ValueError):
        tok("a", context_length=1)


CROSS_CHECK_PROMPTS = [
    "a man waving his hands, sunny day",
    "Fireworks exploding over the lake at night!",
    "",
    "café crème brûlée, naïve façade",
    "東京の夜景 and 北京",
    "a cat 🐱 dancing 🎆🎆 under the 🌙",
    "ＦＵＬＬ－ＷＩＤＴＨ ｔｅｘｔ １２３",
    "the ﬁrst ﬂower, œuvre",
    "fish &amp; chips &lt;3 &amp;amp; more",
    "it's, don't, we're, they've, I'm, you'll, he'd",
    "Shouting LOUDLY!!! ... ??? (parentheses) [brackets] {braces}",
    "year 2024, 3.14159, 1,000,000 stars",
    "tabs\tand\nnewlines   and   spaces",
    "hyphen-ated_words/with\\slashes and @handles #tags",
    "\"quoted\" 'single' `backtick` «guillemets» „low”",
    "Ελληνικά κείμενο, русский текст, עברית, العربية",
    "mojibake: cafÃ© and â€œquotesâ€\x9d",
    "x " * 150,
    " ".join(["elephant"] * 100),
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "zoom in, camera panning left, 4k, ultra-detailed, trending on artstation",
]


def _transformers_tokenizer(tok: Tokenizer, tmp: Path):
    """transformers' CLIPTokenizer from the shipped BPE file (vocab.json from the vocabulary, merges = the file)."""
    import transformers

    vocab = {k: v for k, v in tok.encoder.items() if v < SOT}
    vocab.update({"<|startoftext|>": SOT, "<|endoftext|>": EOT})
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    text = gzip.decompress(files("dynamicrafter").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes())
    lines = text.decode("utf-8").split("\n")
    # transformers 5 reads every line of merges.txt (4.x skipped the header and stopped after 48,894 merges)
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1 : NUM_MERGES + 1]) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(tmp))


def test_matches_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    hf = _transformers_tokenizer(tok, tmp_path)
    got = tok(CROSS_CHECK_PROMPTS)
    for row, prompt in enumerate(CROSS_CHECK_PROMPTS):
        ids = hf(clean_text(prompt), truncation=True, max_length=77)["input_ids"]
        expected = ids + [0] * (77 - len(ids))
        assert got[row].tolist() == expected, prompt
