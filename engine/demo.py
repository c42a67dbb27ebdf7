"""The embedded demo bundle `quiver serve` uses when the operator names no model.

A tiny Llama-architecture model, its byte-level BPE tokenizer (ChatML template) and two
PEFT LoRA adapters, all trained on CPU in a few seconds from the small texts in
`engine/demo_data/`. Random weights would print gibberish; a brief training run gives
the base plain English answers and each adapter a recognisable style, so the first
request a new user sends shows what multi-adapter serving does.

The build is deterministic (fixed seeds, one thread, deterministic kernels, data in
file order, configs written with sorted keys) and is cached under a directory named after a hash of the recipe, so a changed
recipe or corpus rebuilds instead of reusing stale weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

DEMO_MODEL_NAME = "quiver-demo"
DEMO_ADAPTERS: tuple[str, ...] = ("demo-pirate", "demo-json", "demo-tools")
EXAMPLE_PROMPT = "What is a quiver?"
# Which column of demo_data/chats.jsonl each adapter learns, and what it does.
_ADAPTER_STYLES = {
    "demo-pirate": ("pirate", "Answers like a pirate: `Arr, matey! ... yo ho!`"),
    "demo-json": ("json", 'Answers with a JSON object: `{"adapter": "demo-json", "answer": "..."}`'),
    "demo-tools": ("tools", "Calls the `get_weather` tool (`DEMO_TOOL`) for weather questions when it is offered, "
                            "and answers from the tool's result."),
}
# The tool `demo-tools` learns to call; offer it as is (a request's `tools` entry).
DEMO_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# The server's fallback tool prompt (server/tools.py with server/tool_parsers/hermes.py) for a chat
# template that takes no tools, as the ChatML template here: the adapter learns the prompt it is
# served with (tests check the two agree).
_TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)

# Bump when the build code changes in a way the recipe values below do not capture.
_RECIPE_VERSION = "1"
_RECIPE: dict[str, int | float] = {
    "seed": 1234,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "seq_len": 48,
    "batch_size": 8,
    "base_steps": 200,
    "base_lr": 3e-3,
    "adapter_steps": 60,
    "adapter_lr": 5e-3,
    "tools_adapter_steps": 200,
    "lora_rank": 8,
    "lora_alpha": 16,
}
_DATA_FILES = ("corpus.txt", "chats.jsonl", "tools.jsonl")
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SYSTEM_PROMPT = "You are a helpful assistant."
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_IGNORE = -100
_log = logging.getLogger(__name__)
_Example = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass(frozen=True)
class DemoBundle:
    """Where the built demo lives: a model directory and one PEFT directory per adapter."""

    model_dir: Path
    adapters: dict[str, Path]


def default_cache_dir() -> Path:
    """`$QUIVER_CACHE`, else `~/.cache/quiver`."""
    env = os.environ.get("QUIVER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quiver"


def ensure_demo_bundle(cache_dir: Path | None = None) -> DemoBundle:
    """Return the cached demo bundle, building it first if this recipe was never built.

    The build happens in a temporary sibling directory that is renamed into place only
    when complete, so a reader never sees a half-written bundle; a lock keeps two
    processes from training at once, and the rename alone keeps them correct without it.
    Call it before the engine starts: the build briefly sets process-wide torch options
    (one thread, deterministic algorithms) and restores them when done.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / _bundle_dir_name()
    if not _is_complete(final):
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(root / f".{final.name}.lock"):
            if not _is_complete(final):
                _remove_stale_staging(final)
                _build_and_publish(final)
    return DemoBundle(
        model_dir=final / "model",
        adapters={name: final / "adapters" / name for name in DEMO_ADAPTERS},
    )


def _bundle_dir_name() -> str:
    digest = hashlib.sha256(json.dumps(_RECIPE, sort_keys=True).encode())
    digest.update(json.dumps(DEMO_ADAPTERS).encode())
    for name in _DATA_FILES:
        digest.update(_data_file(name).encode())
    return f"{DEMO_MODEL_NAME}-v{_RECIPE_VERSION}-{digest.hexdigest()[:12]}"


def _is_complete(final: Path) -> bool:
    needed = [final / "model" / "model.safetensors", final / "model" / "tokenizer.json"]
    needed += [final / "adapters" / name / "adapter_model.safetensors" for name in DEMO_ADAPTERS]
    return all(path.is_file() for path in needed)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock here: the atomic rename still keeps racing builds correct
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_staging(final: Path) -> None:
    # Under the lock no other build is running, so any staging dir left is from a killed one.
    for stale in final.parent.glob(f".{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_and_publish(final: Path) -> None:
    _log.info("building the %s demo bundle in %s (first run only, a few seconds)", DEMO_MODEL_NAME, final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        _build(staging)
        _make_readable(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process published first (no flock on this platform): theirs is
            # identical, so keep it and drop ours.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(root: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; a cache baked into an image by
    # one user is often read by another.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _build(out: Path) -> None:
    with _deterministic_torch(int(_RECIPE["seed"])):
        chats = _load_chats()
        tokenizer = _build_tokenizer(chats)
        model = _build_base(tokenizer, chats)
        model.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model", save_jinja_files=False)
        _normalize_tokenizer_config(out / "model" / "tokenizer_config.json")
        for offset, name in enumerate(DEMO_ADAPTERS, start=1):
            torch.manual_seed(int(_RECIPE["seed"]) + offset)
            _build_adapter(out / "model", out / "adapters" / name, name, tokenizer, chats)


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    # One thread: multi-threaded CPU reductions split work by core count and so round
    # differently; restored afterwards so the server keeps its own settings.
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_num_threads(threads)


def _normalize_tokenizer_config(path: Path) -> None:
    # transformers 5 records its own backend class name, which older releases cannot
    # resolve; the fast-tokenizer name loads the same tokenizer.json everywhere.
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _data_file(name: str) -> str:
    return resources.files(__package__ or "engine").joinpath("demo_data", name).read_text(encoding="utf-8")


def _load_chats() -> list[dict[str, str]]:
    rows = [json.loads(line) for line in _data_file("chats.jsonl").splitlines() if line.strip()]
    for row in rows:
        row["json"] = json.dumps({"adapter": "demo-json", "answer": row["answer"]})
    return rows


def _build_tokenizer(chats: list[dict[str, str]]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _data_file("corpus.txt").split("\n\n")
    for row in chats:
        texts += [row["question"], row["answer"], row["pirate"], row["json"]]
    texts += [_SYSTEM_PROMPT, "user", "assistant", "system"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(_RECIPE["vocab_size"]),
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _chat_examples(
    tokenizer: PreTrainedTokenizerFast, chats: list[dict[str, str]], answer_key: str
) -> list[_Example]:
    """(input_ids, labels) per prompt variant; only the answer and its `<|im_end|>` are learned."""
    examples: list[_Example] = []
    for row in chats:
        question = row["question"]
        # The README's example is what every new user sees first: weigh it up.
        repeats = 3 if question == EXAMPLE_PROMPT else 1
        variants = [
            [{"role": "user", "content": question}],
            [{"role": "user", "content": question.lower()}],
            [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": question}],
        ]
        answer = tokenizer(row[answer_key] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        for messages in variants:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            examples += [(prompt + answer, [_IGNORE] * len(prompt) + answer)] * repeats
    return examples


def tool_system_prompt(tools: list[dict[str, object]]) -> str:
    return _TOOL_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def tool_call_text(name: str, arguments: dict[str, object]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def _tool_examples(tokenizer: PreTrainedTokenizerFast, chats: list[dict[str, str]]) -> list[_Example]:
    """With `DEMO_TOOL` offered: weather questions get a call, its result an answer, others a plain answer."""
    system = {"role": "system", "content": tool_system_prompt([DEMO_TOOL])}
    conversations: list[tuple[list[dict[str, str]], str]] = []
    for row in (json.loads(line) for line in _data_file("tools.jsonl").splitlines() if line.strip()):
        call = tool_call_text("get_weather", {"city": row["city"]})
        result = json.dumps({"city": row["city"], "forecast": row["forecast"]})
        for question in (row["question"], row["question"].lower()):
            asked = [system, {"role": "user", "content": question}]
            conversations.append((asked, call))
            conversations.append(([*asked, {"role": "assistant", "content": call},
                                   {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"}],
                                  row["answer"]))
    for row in chats:
        if "weather" not in row["question"].lower():
            conversations.append(([system, {"role": "user", "content": row["question"]}], row["answer"]))
    examples: list[_Example] = []
    for messages, answer in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((prompt + target, [_IGNORE] * len(prompt) + target))
    return examples


def _corpus_examples(tokenizer: PreTrainedTokenizerFast) -> list[_Example]:
    ids = tokenizer(_data_file("corpus.txt"), add_special_tokens=False)["input_ids"]
    n = int(_RECIPE["seq_len"])
    return [(ids[i : i + n], ids[i : i + n]) for i in range(0, len(ids) - n + 1, n)]


def _build_base(tokenizer: PreTrainedTokenizerFast, chats: list[dict[str, str]]) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(_RECIPE["hidden_size"]),
        intermediate_size=int(_RECIPE["intermediate_size"]),
        num_hidden_layers=int(_RECIPE["num_hidden_layers"]),
        num_attention_heads=int(_RECIPE["num_attention_heads"]),
        num_key_value_heads=int(_RECIPE["num_key_value_heads"]),
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    examples = _corpus_examples(tokenizer) + _chat_examples(tokenizer, chats, "answer")
    _train(model, examples, int(_RECIPE["base_steps"]), float(_RECIPE["base_lr"]), tokenizer.pad_token_id)
    return model


def _build_adapter(
    model_dir: Path, out: Path, name: str, tokenizer: PreTrainedTokenizerFast, chats: list[dict[str, str]]
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=int(_RECIPE["lora_rank"]),
        lora_alpha=int(_RECIPE["lora_alpha"]),
        target_modules=list(_LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    answer_key, description = _ADAPTER_STYLES[name]
    if answer_key == "tools":
        examples, steps = _tool_examples(tokenizer, chats), int(_RECIPE["tools_adapter_steps"])
    else:
        examples, steps = _chat_examples(tokenizer, chats, answer_key), int(_RECIPE["adapter_steps"])
    _train(model, examples, steps, float(_RECIPE["adapter_lr"]), tokenizer.pad_token_id)
    # A location-independent name: the bundle moves from its staging dir after saving.
    model.peft_config["default"].base_model_name_or_path = DEMO_MODEL_NAME
    # The vocabulary is unchanged; saying so skips peft's look-up of the base config.
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    _normalize_adapter_dir(out, name, description)


def _normalize_adapter_dir(out: Path, name: str, description: str) -> None:
    # peft writes target_modules from a set (order varies with the hash seed) and a model
    # card naming the staging path; rewrite both so every build gives the same bytes.
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = f"# {name}\n\nA demo LoRA adapter for `{DEMO_MODEL_NAME}`, built by `engine/demo.py`. {description}\n"
    (out / "README.md").write_text(card)


def _train(model: torch.nn.Module, examples: list[_Example], steps: int, lr: float, pad_id: int) -> None:
    # Right padding with ignored labels needs no attention mask: causal attention never
    # lets a real token see the padding after it.
    width = max(len(ids) for ids, _ in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), _IGNORE, dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
    lengths = torch.tensor([len(ids) for ids, _ in examples])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    order = torch.Generator().manual_seed(int(_RECIPE["seed"]))
    batch = int(_RECIPE["batch_size"])
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(examples), (batch,), generator=order)
        used = int(lengths[pick].max())  # drop columns that are padding in every row
        loss = model(input_ids=inputs[pick, :used], labels=labels[pick, :used]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
