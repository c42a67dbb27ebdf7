"""A servable model directory of a real shape with no weights: config.json plus a tokenizer.

GPU load tests need a model of the `llama-1b` (or `llama-8b`) shape behind the real server, but
nothing can be downloaded where they run. This writes the shape's config (the one
`load_tests/bench_quiver.py` benchmarks) and a word-level tokenizer covering the full 128,256-id
vocabulary, so that every token the model samples decodes to text; the server then starts with
`--load-format dummy` (random weights of that shape, drawn on the device).

    python load_tests/model_dir.py --shape llama-1b --out /tmp/llama-1b
    python -m server serve --model /tmp/llama-1b --load-format dummy --device cuda
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.bench_quiver import SHAPES, hf_config  # noqa: E402

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def corpus_words() -> list[str]:
    """The words and punctuation of the embedded demo data, so that English prompts get distinct ids."""
    words: set[str] = set()
    for name in ("corpus.txt", "chats.jsonl"):
        text = (resources.files("engine") / "demo_data" / name).read_text(encoding="utf-8")
        words.update(re.findall(r"\w+|[^\w\s]", text))
    return sorted(words)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly `vocab_size` ids: the specials, the demo data's words, then
    `w<id>` for the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in ("system", "user", "assistant", *corpus_words()):
        vocab.setdefault(word, len(vocab))
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def write_model_dir(out: Path, shape: str, num_layers: int | None = None) -> Path:
    """config.json of `shape` (EOS `</s>`, id 3) and the tokenizer; no weights."""
    cfg = hf_config(shape, num_layers)
    cfg.eos_token_id = SPECIALS.index("</s>")
    cfg.bos_token_id = SPECIALS.index("<s>")
    cfg.pad_token_id = SPECIALS.index("<pad>")
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    write_tokenizer(out, cfg.vocab_size)
    (out / "README.md").write_text(f"Random-weight {shape} shape: serve with --load-format dummy.\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--layers", type=int, default=None, help="Fewer layers than the shape has (smoke runs).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    path = write_model_dir(args.out, args.shape, args.layers)
    print(json.dumps({"model_dir": str(path), "shape": args.shape}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
