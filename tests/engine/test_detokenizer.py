from __future__ import annotations

import json
import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from tests.factories import build_tokenizer

TEXTS = [
    "Hello world! The quick brown fox.",
    "Un café au lait, déjà vu.",
    "中文测试：你好，世界。",
    "Emoji: 🎯🏹✨ and ∑ ≈ ≤.",
    "def add(a, b):\n    return a + b",
]


def build_sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: Metaspace pre-tokenizer, BPE with <0xNN> byte fallback."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=260, special_tokens=specials, limit_alphabet=50, show_progress=False
    )
    trainer_tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def byte_level():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece():
    return build_sentencepiece_tokenizer()


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Random tokens, including specials and pieces of multi-byte characters.

    Sentencepiece's byte-fallback decoder turns a whole run of <0xNN> tokens into U+FFFD when
    the run is not valid UTF-8, so a later byte can change how earlier ones decode: no
    streaming decoder can match that. Byte tokens therefore only come as whole characters.
    """
    vocab = [
        i
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))
        if not piece.startswith("<0x")
    ]
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.3:
            ids += encode(tokenizer, rng.choice("é中文试🎯✨≤"))
        else:
            ids.append(rng.choice(vocab))
    return ids


def stream(tokenizer, prompt: list[int], output: list[int], stop=(), **kwargs):
    detok = IncrementalDetokenizer(tokenizer, prompt, list(stop), **kwargs)
    deltas = [detok.add(t) for t in output]
    return detok, deltas


def test_multibyte_characters_are_split_across_tokens(byte_level, sentencepiece) -> None:
    # Guards the other tests: they only mean something if characters span tokens.
    for tok in (byte_level, sentencepiece):
        singles = [tok.decode([i]) for i in encode(tok, "中文 猫 🐍")]
        assert any("\ufffd" in s for s in singles)


def test_random_token_sequences_match_a_full_decode(tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(40):
        output = random_ids(tokenizer, rng, rng.randrange(1, 30))
        detok, deltas = stream(tokenizer, [], output)
        full = tokenizer.decode(output, skip_special_tokens=True)
        assert full.startswith("".join(deltas))
        tail = detok.flush()
        assert "".join(deltas) + tail == full.rstrip("\ufffd")
        assert detok.text == "".join(deltas) + tail


def test_output_after_a_prompt_matches_the_full_decode(tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(20):
        prompt = encode(tokenizer, rng.choice(TEXTS))
        output = random_ids(tokenizer, rng, rng.randrange(1, 20))
        detok, deltas = stream(tokenizer, prompt, output)
        full = tokenizer.decode(prompt + output, skip_special_tokens=True)
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
        assert "".join(deltas) + detok.flush() == full[len(prompt_text) :].rstrip("\ufffd")


def test_first_output_token_keeps_its_leading_space(sentencepiece) -> None:
    prompt, rest = encode(sentencepiece, "Hello"), encode(sentencepiece, "Hello world")
    assert rest[: len(prompt)] == prompt
    output = rest[len(prompt) :]
    assert not sentencepiece.decode(output).startswith(" ")  # decoded alone, the space is lost
    detok, deltas = stream(sentencepiece, prompt, output)
    assert "".join(deltas) + detok.flush() == " world"


def test_no_delta_holds_half_a_character(tokenizer) -> None:
    rng = random.Random(2)
    for _ in range(20):
        text = "".join(rng.choice(TEXTS) for _ in range(2))
        ids = encode(tokenizer, text)
        detok, deltas = stream(tokenizer, [], ids)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)


def test_special_tokens_are_not_emitted(byte_level) -> None:
    eos = byte_level.eos_token_id
    ids = encode(byte_level, "ok") + [eos] + encode(byte_level, "go")
    detok, deltas = stream(byte_level, [], ids)
    assert "".join(deltas) + detok.flush() == "okgo"
    detok, deltas = stream(byte_level, [], ids, skip_special_tokens=False)
    assert "".join(deltas) + detok.flush() == "ok<|im_end|>go"


def test_stop_string_across_tokens_is_never_partially_emitted(tokenizer) -> None:
    text = "The answer is 中文 done, then more"
    ids = encode(tokenizer, text)
    stop = "中文 done"
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # it spans several tokens
    detok = IncrementalDetokenizer(tokenizer, [], [stop])
    for token_id in ids:
        detok.add(token_id)
        assert "The answer is ".startswith(detok.text)
    assert detok.stopped
    assert detok.text == "The answer is "
    assert detok.add(ids[0]) == ""
    assert detok.flush() == ""
    assert detok.text == "The answer is "


def test_earliest_stop_string_wins(tokenizer) -> None:
    ids = encode(tokenizer, "The quick brown fox jumps")
    detok, _ = stream(tokenizer, [], ids, stop=["fox", "quick"])
    assert detok.stopped and detok.text == "The "
    # Both complete with the same token; the one that starts first wins.
    detok, _ = stream(tokenizer, [], ids, stop=["fox", "brown fox"])
    assert detok.stopped and detok.text == "The quick "


def test_flush_releases_text_held_for_a_stop_string_that_never_came(tokenizer) -> None:
    ids = encode(tokenizer, "hello worl")
    detok, deltas = stream(tokenizer, [], ids, stop=["world!"])
    assert "".join(deltas) == "hello "
    assert not detok.stopped
    assert detok.flush() == "worl"
    assert detok.text == "hello worl"


def test_a_held_prefix_is_released_once_it_cannot_be_a_stop(tokenizer) -> None:
    ids = encode(tokenizer, "a wor then the end")
    detok, deltas = stream(tokenizer, [], ids, stop=["world"])
    assert not detok.stopped
    assert "".join(deltas) + detok.flush() == "a wor then the end"


def test_each_step_decodes_a_short_window(byte_level) -> None:
    lengths: list[int] = []
    real_decode = byte_level.decode

    class Spy:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return real_decode(ids, **kwargs)

    ids = encode(byte_level, " ".join(TEXTS * 3))
    detok = IncrementalDetokenizer(Spy(), encode(byte_level, TEXTS[0]), [])
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == byte_level.decode(ids)
    assert len(ids) > 100 and max(lengths) <= 8
