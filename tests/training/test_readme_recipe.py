"""The README's fine-tuning recipe, as written there, teaches the demo model JSON for any seed.

The `quiver train` and `quiver serve` commands and the before/after table are read out of
README.md, so the documentation cannot drift from what this test holds; only the model path,
the output directory and the seed are swapped (and no checkpoints are kept). Each adapter is
served by the engine (what `quiver serve` runs) and asked every question of the example file,
greedily. Three seeds take about 25 seconds on one idle core (a minute or more on a busy machine).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.demo import EXAMPLE_PROMPT, ensure_demo_bundle
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from training.cli import main

REPO = Path(__file__).resolve().parents[2]
SEEDS = (1, 2, 3)


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Fine-tuning\n")
    return text[start : text.index("\n## ", start + 1)]


def _commands(section: str) -> list[list[str]]:
    """Each shell command of the section's bash blocks, continuation lines joined."""
    commands: list[list[str]] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(shlex.split(line))
    return commands


def _recipe(section: str) -> tuple[list[str], str, str]:
    """(the `quiver train` arguments, the served adapter's name, its path)."""
    commands = _commands(section)
    train = next(c for c in commands if c[:2] == [".venv/bin/quiver", "train"])
    serve = next(c for c in commands if c[:2] == [".venv/bin/quiver", "serve"])
    name, path = serve[serve.index("--adapter") + 1].split("=", 1)
    return train[2:], name, path


def _table(section: str) -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+)` \([a-z]+\) \| (.+) \|$", section, flags=re.M)
    return dict(rows)


def _with(args: list[str], flag: str, value: str) -> list[str]:
    at = args.index(flag)
    return [*args[: at + 1], value, *args[at + 2 :]]


def _greedy(engine: LLMEngine, adapter: str | None, question: str) -> str:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    engine.add_request(f"{adapter}-{question}", ids, SamplingParams(max_tokens=64, temperature=0.0), adapter)
    tokens: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.extend(delta.token_ids)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def _taught(data: Path) -> dict[str, dict[str, str]]:
    """Each question asked without a system prompt -> the JSON object it should get."""
    taught: dict[str, dict[str, str]] = {}
    for line in data.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if [m["role"] for m in messages] == ["user", "assistant"]:
            taught[messages[0]["content"]] = json.loads(messages[1]["content"])
    return taught


def test_the_readme_recipe_names_what_it_serves() -> None:
    section = _readme_section()
    args, name, path = _recipe(section)
    assert args[args.index("--output") + 1] == path  # the served adapter is the one trained
    assert args[args.index("--model") + 1] == "$DEMO" and "--seed" in args
    assert set(_table(section)) == {"quiver-demo", name}
    assert EXAMPLE_PROMPT in section


@pytest.mark.slow
def test_the_readme_recipe_teaches_json_for_every_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    section = _readme_section()
    args, name, _ = _recipe(section)
    table = _table(section)
    demo = ensure_demo_bundle()
    args = _with(args, "--model", str(demo.model_dir))
    data = REPO / args[args.index("--data") + 1]
    taught = _taught(data)
    assert len(taught) == 24  # twelve questions, as written and lower-cased

    adapters: dict[str, Path] = {}
    for seed in SEEDS:
        out = tmp_path / f"seed-{seed}"
        run = _with(_with(args, "--output", str(out)), "--seed", str(seed))
        assert main([*run, "--no-progress", "--save-total-limit", "0"]) == 0, capsys.readouterr().err
        adapters[f"{name}-{seed}"] = out

    engine = LLMEngine(EngineConfig(model=str(demo.model_dir), device="cpu", dtype="float32", max_model_len=256,
                                    max_lora_rank=64), adapters=adapters)
    assert _greedy(engine, None, EXAMPLE_PROMPT) == table["quiver-demo"]
    for adapter in adapters:
        assert _greedy(engine, adapter, EXAMPLE_PROMPT) == table[name], adapter
        for question, expected in taught.items():
            answer = _greedy(engine, adapter, question)
            assert json.loads(answer) == expected, (adapter, question, answer)
