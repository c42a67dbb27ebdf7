"""`quiver train` on the GPU, then its adapters served by Quiver and checked against PEFT.

A llama-1b-shaped model with random bf16 weights (written to disk: training loads real
weights, not `--load-format dummy`), a synthetic chat set that teaches one fixed answer,
then `python -m training` (the same command as `quiver train`) twice as a child process:
bf16 LoRA and QLoRA (`--quantize 4bit`, bitsandbytes). The trainer reports its tokens/s and
peak GPU memory in its `done` event. Both adapters are then served by one in-process
`AsyncEngine` (no HTTP stack needed) and each greedy answer is checked: it loads and
answers, it matches PEFT + transformers running the same adapter on the same base (the
soak's near-tie rule, `greedy_match.py`), and it differs from the base model's answer.

A QLoRA adapter is served on the bf16 base (Quiver does not quantize), so its reference is
PEFT on that same bf16 base. Without CUDA or bitsandbytes the QLoRA run is skipped and the
reason recorded. `--device cpu --tiny` is the smoke version the test suite runs.

    python load_tests/train_gpu.py --out load_tests/results/train-gpu
    python load_tests/train_gpu.py --device cpu --tiny --out /tmp/train-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from load_tests.greedy_match import Step, compare_greedy  # noqa: E402
from load_tests.model_dir import SPECIALS, corpus_words, write_model_dir, write_tokenizer  # noqa: E402
from load_tests.train_gpu_report import summary, versions, write_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ANSWER = "Quiver serves many adapters from one base model"  # every word is one token of the tokenizer
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
TOP = 5  # alternatives kept per generated token, as the soak asks the API for


def write_random_model(out: Path, tiny: bool, device: str, seed: int) -> Path:
    """A model directory with real random weights: config, tokenizer, safetensors.

    The llama-1b shape comes from `model_dir.write_model_dir` (bf16, about 2.5 GB), drawn on
    `device` with transformers' own initialisation; `tiny` is a 2-layer fp32 llama for the CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if tiny:
        config = LlamaConfig(**TINY, bos_token_id=SPECIALS.index("<s>"), eos_token_id=SPECIALS.index("</s>"),
                             pad_token_id=SPECIALS.index("<pad>"))
        config.architectures = ["LlamaForCausalLM"]
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        write_tokenizer(out, config.vocab_size)
    else:
        write_model_dir(out, "llama-1b")
        config = AutoConfig.from_pretrained(out)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    (out / "README.md").write_text(f"Random weights ({'tiny' if tiny else 'llama-1b'} shape), for training runs.\n")
    del model
    _free(device)
    return out


def write_dataset(path: Path, tokenizer: Any, examples: int, seq_len: int, seed: int) -> Path:
    """Chat examples of exactly `seq_len` tokens: a prompt of random words, always the answer `ANSWER`.

    One fixed answer is learnable in a few dozen steps even on random weights, so the trained
    adapter's greedy output is confident and visibly unlike the base model's.
    """
    words = _prompt_words(tokenizer)
    overhead = len(_chat_ids(tokenizer, words[0], ANSWER)) - 1  # everything but the prompt's one word
    if seq_len <= overhead:
        raise ValueError(f"--seq-len {seq_len} leaves no room for a prompt ({overhead} tokens are template "
                         "and answer)")
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(examples):
            prompt = " ".join(rng.choices(words, k=seq_len - overhead))
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ANSWER}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def _prompt_words(tokenizer: Any) -> list[str]:
    """The `w<id>` filler words: one token each, never part of the answer."""
    vocab = tokenizer.get_vocab()
    taken = set(SPECIALS) | set(corpus_words()) | {"system", "user", "assistant"}
    return sorted(w for w in vocab if w.startswith("w") and w[1:].isdigit() and w not in taken)


def _chat_ids(tokenizer: Any, prompt: str, answer: str | None = None) -> list[int]:
    """Token ids as the trainer and the server see them: the chat template, then no extra specials."""
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"{text!r} has words the tokenizer does not know")
    return ids


def run_training(model: Path, data: Path, out: Path, args: argparse.Namespace,
                 quantize: str | None) -> dict[str, Any]:
    """`python -m training` as a child process; its `done` event plus speeds read from its events."""
    command = [sys.executable, "-m", "training", "--model", str(model), "--data", str(data), "--output", str(out),
               "--overwrite", "--no-progress", "--device", args.device, "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.seq_len), "--lr", str(args.lr),
               "--lora-rank", str(args.rank), "--lora-alpha", str(2 * args.rank), "--save-total-limit", "0",
               "--seed", str(args.seed)]
    if quantize:
        command += ["--quantize", quantize]
    from training.run_guard import PARENT_PID_ENV

    # The trainer dies with this process (a `timeout` around the run leaves no orphan holding the GPU).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               **{PARENT_PID_ENV: str(os.getpid())})
    started = time.monotonic()
    log = out.with_suffix(".log")
    with open(log, "w", encoding="utf-8") as handle:
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=args.train_timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"command": " ".join(command[1:]), "log": str(log),
                    "error": f"no result within --train-timeout {args.train_timeout} s"}
    wall = time.monotonic() - started
    run = {"command": " ".join(command[1:]), "wall_s": round(wall, 1), "log": str(log)}
    if proc.returncode != 0:
        return {**run, "error": f"exit status {proc.returncode}: "
                + log.read_text(encoding="utf-8", errors="replace")[-2000:]}
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    return {**run, **training_numbers(events)}


def training_numbers(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the trainer reported (tokens/s, peak memory, loss), plus a steady-state rate.

    The steady rate leaves out the first tenth of the steps (at least two: CUDA start-up,
    allocator growth, kernel selection), measured between the trainer's own metrics events.
    """
    done = next(e for e in events if e["type"] == "done")
    metrics = [e for e in events if e["type"] == "metrics"]
    first = metrics[min(max(2, len(metrics) // 10), len(metrics) - 1)] if len(metrics) > 1 else None
    last = metrics[-1] if metrics else None
    steady = None
    if first is not None and last is not None and last["elapsed_s"] > first["elapsed_s"]:
        steady = round((last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]), 1)
    return {"adapter": done["path"], "steps": done["step"], "trained_tokens": done["trained_tokens"],
            "tokens_per_s": done.get("tokens_per_s"), "steady_tokens_per_s": steady,
            "train_seconds": done.get("train_seconds"), "peak_memory_gb": done.get("peak_memory_gb"),
            "elapsed_s": done.get("elapsed_s"),
            "first_loss": metrics[0]["train_loss"] if metrics else None,
            "last_loss": metrics[-1]["train_loss"] if metrics else None}


def qlora_unavailable(device: str) -> str | None:
    """Why QLoRA cannot run here, or None when it can."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "no CUDA device (bitsandbytes quantizes on the GPU)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (carry its wheel: .whl-train/)"
    return None


def serve_greedy(model: Path, adapters: dict[str, Path], prompt: list[int], tokens: int, device: str,
                 rank: int) -> dict[str, list[Step]]:
    """Greedy answers (with top alternatives) from one in-process Quiver engine: base ("") and each adapter."""
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

    cuda = device.startswith("cuda")
    config = EngineConfig(model=str(model), device=device, max_model_len=len(prompt) + tokens + 16, max_num_seqs=4,
                          max_loras=max(1, len(adapters)), max_lora_rank=rank, cuda_graph_max_batch=4,
                          kv_cache_memory=(2 << 30) if cuda else 0)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, top_logprobs=TOP)

    async def answer(engine: AsyncEngine, name: str) -> list[Step]:
        steps: list[Step] = []
        async for delta in engine.generate(f"check-{name or 'base'}", prompt, params, adapter=name or None):
            if delta.error:
                raise RuntimeError(f"serving {name or 'the base'} failed: {delta.error}")
            steps += [Step(str(lp.token_id), lp.logprob, {str(t): v for t, v in lp.top}) for lp in delta.logprobs]
        return steps

    async def run() -> dict[str, list[Step]]:
        engine = AsyncEngine(config, adapters={k: str(v) for k, v in adapters.items()})
        await engine.start()
        try:
            return {name: await answer(engine, name) for name in ("", *adapters)}
        finally:
            await engine.shutdown()

    try:
        return asyncio.run(run())
    finally:
        _free(device)


def reference_greedy(model: Path, adapters: dict[str, Path], prompt: list[int], tokens: int,
                     device: str) -> dict[str, list[Step]]:
    """The same greedy answers from transformers + PEFT (at least one adapter): the oracle.

    A full forward per token and no KV cache: slow, but nothing of the engine's is shared.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    (first, first_path), *others = adapters.items()
    with warnings.catch_warnings():  # peft asks transformers a question transformers has renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(first_path), adapter_name=first)
        for name, path in others:
            peft_model.load_adapter(str(path), adapter_name=name)
    try:
        with peft_model.disable_adapter():
            results = {"": _greedy(peft_model, prompt, tokens, device)}
        for name in adapters:
            peft_model.set_adapter(name)
            results[name] = _greedy(peft_model, prompt, tokens, device)
    finally:
        del base, peft_model
        _free(device)
    return results


@torch.inference_mode()
def _greedy(model: Any, prompt: list[int], tokens: int, device: str) -> list[Step]:
    ids = list(prompt)
    steps = []
    for _ in range(tokens):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        values, top = (t.tolist() for t in logprobs.topk(TOP))
        chosen = top[0]
        steps.append(Step(str(chosen), values[0], {str(t): v for t, v in zip(top, values, strict=True)}))
        ids.append(chosen)
    return steps


def check_adapter(served: list[Step], reference: list[Step], served_base: list[Step], tolerance: float,
                  answer_ids: list[int]) -> dict[str, Any]:
    """(a) it answered, (b) it matches the PEFT reference, (c) it is not the base model's answer."""
    match = compare_greedy(reference, served, tolerance)
    agreed = match.index if match.index is not None else len(served)
    drift = max((abs(s.logprob - r.logprob) for s, r in zip(served[:agreed], reference, strict=False)), default=0.0)
    same_tokens = [s.token for s in served] == [b.token for b in served_base]
    gap = max((abs(s.logprob - b.logprob) for s, b in zip(served, served_base, strict=False)), default=0.0)
    differs = not same_tokens or gap > 0.05
    answered = len(served) == len(reference) > 0
    return {"answered": answered, "matches_reference": match.outcome != "mismatch", "match": match.outcome,
            "divergence_index": match.index, "divergence_gap_nats": match.gap, "match_detail": match.detail,
            "max_logprob_diff_vs_reference": round(drift, 4),
            "differs_from_base": differs, "max_logprob_gap_vs_base": round(gap, 4),
            "learned_answer": [int(s.token) for s in served[: len(answer_ids)]] == answer_ids,
            "served_tokens": [int(s.token) for s in served], "reference_tokens": [int(s.token) for s in reference],
            "ok": answered and match.outcome != "mismatch" and differs}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "train-gpu",
                        help="Prefix of OUT.json and OUT.md.")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu.")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer fp32 llama instead of the llama-1b shape.")
    parser.add_argument("--workdir", type=Path, default=None, help="Model, data and adapters (default: a temp dir).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default 150; tiny 8).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per example (default 512; tiny 48).")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="Peak learning rate (default 1e-3; tiny 1e-2).")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--check-tokens", type=int, default=12, help="Greedy tokens compared per answer.")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="Near-tie tolerance in nats (default 0.15 on CUDA in bf16, as the GPU soak runs use; "
                             "0 on the CPU in fp32).")
    parser.add_argument("--skip-qlora", action="store_true")
    parser.add_argument("--train-timeout", type=float, default=300.0, help="Seconds per training run.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps or (8 if args.tiny else 150)
    args.seq_len = args.seq_len or (48 if args.tiny else 512)
    args.lr = args.lr or (1e-2 if args.tiny else 1e-3)
    if args.tolerance is None:
        args.tolerance = 0.15 if args.device.startswith("cuda") else 0.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    args = parse_args(argv)
    transformers_logging.disable_progress_bar()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-gpu-"))
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "shape": "tiny llama (fp32)" if args.tiny else "llama-1b (random bf16 weights)",
        "qlora_skipped": "--skip-qlora" if args.skip_qlora else qlora_unavailable(args.device),
        "training": {}, "serving": {},
        "config": {k: vars(args)[k] for k in ("steps", "batch_size", "seq_len", "examples", "lr", "rank",
                                              "check_tokens", "tolerance", "seed")},
        "phases_s": {}, "versions": versions(),
        "command": " ".join(["python", "load_tests/train_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    clock = time.monotonic()

    def lap(name: str) -> None:
        """Record a phase's time and write the report so far (a run cut short still leaves its numbers)."""
        nonlocal clock
        result["phases_s"][name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()
        print(f"[train-gpu] {name}: {result['phases_s'][name]} s", flush=True)
        write_report(args.out, result)

    model = write_random_model(workdir / "model", args.tiny, args.device, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = write_dataset(workdir / "train.jsonl", tokenizer, args.examples, args.seq_len, args.seed)
    lap("model_and_data")
    if result["qlora_skipped"]:
        print(f"[train-gpu] QLoRA skipped: {result['qlora_skipped']}", flush=True)
    for name, quantize in {"bf16": None, "qlora": "4bit"}.items():
        if quantize is None or not result["qlora_skipped"]:
            result["training"][name] = run_training(model, data, workdir / f"adapter-{name}", args, quantize)
            lap(f"train_{name}")
    adapters = {name: Path(t["adapter"]) for name, t in result["training"].items() if "error" not in t}
    result["serving"] = check_served(model, adapters, tokenizer, args, lap)
    result["serving"].update({name: {"ok": False, "error": "training failed"}
                              for name in result["training"] if name not in adapters})
    write_report(args.out, result)
    print(json.dumps(summary(result)), flush=True)
    return 0 if result["serving"] and all(s["ok"] for s in result["serving"].values()) else 1


def check_served(model: Path, adapters: dict[str, Path], tokenizer: Any, args: argparse.Namespace,
                 lap: Callable[[str], None]) -> dict[str, Any]:
    """Serve every adapter with Quiver, run PEFT on the same prompt, and check each answer."""
    if not adapters:
        return {}
    prompt = _chat_ids(tokenizer, " ".join(random.Random(args.seed + 1).choices(_prompt_words(tokenizer), k=24)))
    try:
        served = serve_greedy(model, adapters, prompt, args.check_tokens, args.device, args.rank)
        lap("serve")
        reference = reference_greedy(model, adapters, prompt, args.check_tokens, args.device)
        lap("reference")
    except Exception as exc:  # reported per adapter: the training numbers above still stand
        return {name: {"ok": False, "error": f"{type(exc).__name__}: {exc}"} for name in adapters}
    answer_ids = list(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    checks = {name: check_adapter(served[name], reference[name], served[""], args.tolerance, answer_ids)
              for name in adapters}
    base = compare_greedy(reference[""], served[""], args.tolerance)
    print(f"[train-gpu] base model against PEFT (information only): {base.outcome}, {base.detail}", flush=True)
    return checks


if __name__ == "__main__":
    raise SystemExit(main())
