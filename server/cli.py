"""The `quiver` command line: `quiver serve ...` (and `quiver train ...`, `quiver eval ...` from training/).

Every serve option can also come from an environment variable (QUIVER_MODEL, QUIVER_PORT,
...); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

# (flag, type, default, help); the environment variable is QUIVER_ + the flag in upper snake case.
_SERVE_OPTIONS: list[tuple[str, Callable[[str], Any], Any, str]] = [
    ("--model", str, None,
     "Base model: a local directory or a Hugging Face hub id. Without it the embedded demo model "
     "and its demo adapters are served."),
    ("--served-model-name", str, None,
     "Name clients use in `model` for the base model (default: the model directory's name)."),
    ("--host", str, DEFAULT_HOST, "Interface to listen on (0.0.0.0 for all)."),
    ("--port", int, DEFAULT_PORT, "TCP port to listen on."),
    ("--api-key", str, None,
     "Require `Authorization: Bearer KEY` on /v1 routes (401 otherwise). Default: no authentication."),
    ("--admin-key", str, None,
     "Require `Authorization: Bearer KEY` on the admin routes (adapters, files, fine-tuning jobs); the API key "
     "then no longer opens them. Default: they need the API key, if one is set."),
    ("--max-model-len", int, 2048, "Longest sequence (prompt + output) in tokens."),
    ("--max-num-seqs", int, 64, "Most sequences in one running batch."),
    ("--max-num-batched-tokens", int, 4096, "Most tokens in one forward pass (raised to --max-model-len)."),
    ("--max-waiting", int, 1024, "Queued requests beyond which new ones get 429 with Retry-After."),
    ("--max-loras", int, 8, "GPU LoRA slots: the most distinct adapters in one running batch "
                            "(alias --max-gpu-adapters)."),
    ("--max-lora-rank", int, 64, "Largest adapter rank accepted."),
    ("--max-cpu-adapters", int, None, "Adapters kept in host memory, LRU (at least --max-loras; default: "
                                      "the larger of 64 and --max-loras)."),
    ("--adapter-root", str, None, "Directory whose adapter subdirectories are served by name; sources "
                                  "registered over HTTP must lie inside it."),
    ("--jobs-dir", str, None, "Where fine-tuning jobs keep uploads, runs and the adapters they train (default: "
                              "jobs/<served model name>/ under $QUIVER_CACHE or ~/.cache/quiver)."),
    ("--state-db", str, None, "SQLite file keeping projects, deployments and adapters registered at run time "
                              "across restarts (default: state.sqlite3 in --jobs-dir)."),
    ("--dtype", str, "auto", "Weights and activations: auto (float32 on CPU, bfloat16 on CUDA), float32, "
                             "float16 or bfloat16."),
    ("--device", str, "auto", "auto (CUDA when available), cpu, cuda or cuda:N."),
    ("--tensor-parallel-size", int, 1, "Shard the model over this many GPUs (0..N-1): this process serves HTTP "
                                       "and schedules as rank 0 and starts N-1 worker processes (NCCL, NVLink "
                                       "multicast off). With --device cpu, N processes over gloo."),
    ("--block-size", int, 16, "Tokens per KV-cache block."),
    ("--num-kv-blocks", int, 0, "KV-cache blocks; 0 sizes the cache from --kv-cache-memory or free memory."),
    ("--kv-cache-memory", int, 0, "Bytes for the KV cache; 0 sizes it from free GPU memory (or, on CPU, "
                                  "from max-num-seqs x max-model-len)."),
    ("--gpu-memory-utilization", float, 0.9, "Fraction of GPU memory the server may use."),
    ("--seed", int, 0, "Seed of the engine's random state (requests may pass their own `seed`)."),
    ("--load-format", str, "auto", "auto (the model directory's safetensors) or dummy (random weights of its "
                                   "config's shape: benchmarks and load tests of a model shape without its weights)."),
    ("--log-level", str, "info", "Log level: debug, info, warning, error."),
    ("--log-format", str, "json", "Log lines: json (one object per line, with the request id) or text."),
    ("--max-request-bytes", int, 16 * 2**20, "Largest request body in bytes (413 beyond; 0: no limit). "
                                             "Training-file uploads have their own cap."),
    ("--max-prompt-tokens", int, 0, "Longest prompt in tokens (400 beyond; 0: the model's context)."),
    ("--max-tokens-ceiling", int, 0, "Most tokens one choice may generate: a larger max_tokens gets 400, an "
                                     "omitted one is capped to it (0: the model's context)."),
    ("--max-concurrent-requests", int, 0, "Chat and completion requests in flight beyond which new ones get 429 "
                                          "with Retry-After (0: no limit; --max-waiting still applies)."),
    ("--shutdown-timeout", float, 30.0, "Seconds in-flight requests get to finish after SIGTERM before they "
                                        "are cut; then the server exits 0."),
    ("--tool-call-parser", str, None, "Format tool calls are parsed from (and forced in): hermes (`<tool_call>` JSON, "
                                      "Hermes/Qwen), llama3_json (Llama 3.1 JSON) or mistral (`[TOOL_CALLS]`). "
                                      "Default: picked from the chat template (hermes when it says nothing)."),
    ("--metrics-max-adapters", int, 64, "Adapters that get their own label value in /metrics; later ones "
                                        "share `other`."),
    ("--chat-template", str, None, "A Jinja chat template (a file, or the template itself) used instead of the "
                                   "tokenizer's, for every model served (default: the tokenizer's; ChatML "
                                   "without one)."),
    ("--max-logprobs", int, 20, "Most alternatives per token a request may ask for: `top_logprobs` on chat, "
                                "`logprobs` on /v1/completions (which OpenAI caps at 5); 0 to 20."),
    ("--allowed-origins", str, None, "Browser origins allowed to call the server (CORS): a comma-separated list "
                                     "such as https://app.example.com, or * for any. Default: none (no CORS "
                                     "headers; browsers refuse cross-origin calls)."),
]


def env_name(flag: str) -> str:
    return "QUIVER_" + flag.lstrip("-").replace("-", "_").upper()


def _parse_adapter(value: str) -> tuple[str, Path | str]:
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    if path.strip().startswith("hf://"):  # a hub id, not a path
        return name.strip(), path.strip()
    return name.strip(), Path(path.strip()).expanduser()


def _parse_lora_module(value: str) -> tuple[str, Path | str]:
    """vLLM's `--lora-modules` item: NAME=PATH, or `{"name": ..., "path": ..., "base_model_name": ...}`."""
    if not value.lstrip().startswith("{"):
        return _parse_adapter(value)
    try:
        item = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None
    name, path = (item.get("name"), item.get("path")) if isinstance(item, dict) else (None, None)
    if not isinstance(name, str) or not isinstance(path, str):
        raise argparse.ArgumentTypeError(f'expected {{"name": NAME, "path": PATH}}, got {value!r}')
    # base_model_name is accepted and not needed: every adapter is served on --model.
    return _parse_adapter(f"{name}={path}")


def read_chat_template(value: str) -> str:
    """`--chat-template`: a file's text, or the template itself; ValueError when it is neither or bad Jinja."""
    import jinja2

    path = Path(value).expanduser()
    if path.is_file():
        template = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template {value!r} is not a valid Jinja template: {exc}") from None
    return template


def parse_allowed_origins(value: str | None) -> list[str]:
    """`--allowed-origins`: a comma-separated list, `*` for any; empty: CORS off."""
    origins = [origin.strip() for origin in (value or "").split(",") if origin.strip()]
    return ["*"] if "*" in origins else origins


def _env_default(flag: str, kind: Callable[[str], Any], default: Any, parser: argparse.ArgumentParser) -> Any:
    raw = os.environ.get(env_name(flag))
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        parser.error(f"{env_name(flag)}={raw!r} is not a valid {kind.__name__}")


def add_serve_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="Serve a base model and its LoRA adapters over the OpenAI API.",
        description="Serve a base model and its LoRA adapters over the OpenAI API. Each option can also "
                    "be set by the environment variable shown; the flag wins.",
    )
    for flag, kind, default, help_text in _SERVE_OPTIONS:
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, type=kind, default=_env_default(flag, kind, default, parser),
                            help=f"{help_text}{shown} [env {env_name(flag)}]")
    parser.add_argument(
        "--protect-metrics", action="store_true",
        default=os.environ.get(env_name("--protect-metrics"), "").lower() in ("1", "true", "yes"),
        help="Make /metrics need the API key (or the admin key) like the /v1 routes (default: open). "
             f"[env {env_name('--protect-metrics')}]",
    )
    parser.add_argument("--max-gpu-adapters", dest="max_loras", type=int, default=argparse.SUPPRESS,
                        help="Alias of --max-loras.")
    parser.add_argument(
        "--refuse-base-mismatch", action="store_true",
        default=os.environ.get(env_name("--refuse-base-mismatch"), "").lower() in ("1", "true", "yes"),
        help="Fail adapters whose base_model_name_or_path names another model (default: load them with a "
             f"warning). [env {env_name('--refuse-base-mismatch')}]",
    )
    parser.add_argument(
        "--no-async-scheduling", action="store_true",
        default=os.environ.get(env_name("--no-async-scheduling"), "").lower() in ("1", "true", "yes"),
        help="Run one engine step at a time (default: the next step is scheduled and launched while the "
             f"device computes the current one). [env {env_name('--no-async-scheduling')}]",
    )
    parser.add_argument(
        "--mixed-steps", action="store_true",
        default=os.environ.get(env_name("--mixed-steps"), "").lower() in ("1", "true", "yes"),
        help="Let a step that admits prompts also decode the running sequences, so a burst of prompts does "
             f"not pause running streams (such steps run without CUDA graphs). [env {env_name('--mixed-steps')}]",
    )
    env_adapters = [item for item in os.environ.get("QUIVER_ADAPTERS", "").split(",") if item.strip()]
    try:
        adapter_defaults = [_parse_adapter(item) for item in env_adapters]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"QUIVER_ADAPTERS: {exc}")
    parser.add_argument(
        "--adapter", dest="adapters", metavar="NAME=PATH", type=_parse_adapter, action="append", default=None,
        help="A LoRA adapter (PEFT directory, or hf://org/repo[@revision]) served under NAME; repeat for more. "
             "[env QUIVER_ADAPTERS, comma-separated; flags replace it]",
    )
    parser.add_argument(
        "--lora-modules", dest="adapters", metavar="NAME=PATH", nargs="+", type=_parse_lora_module, action="extend",
        help="vLLM's spelling of --adapter: NAME=PATH items, or JSON items "
             '\'{"name": "x", "path": "/p", "base_model_name": "..."}\' (base_model_name is accepted and not '
             "needed). Adds to --adapter.",
    )
    parser.add_argument("--enable-lora", action="store_true",
                        help="Accepted for vLLM command lines and does nothing: LoRA adapters are always enabled.")
    parser.set_defaults(func=run_serve, adapter_defaults=adapter_defaults)


def _add_train_parser(subparsers: Any) -> None:
    # `quiver train` belongs to training/: its module `training.cli` provides
    # `add_train_parser(subparsers)`, which registers the subcommand and its `func`.
    if importlib.util.find_spec("training.cli") is None:
        return
    from training import cli as training_cli

    training_cli.add_train_parser(subparsers)


def _add_eval_parser(subparsers: Any) -> None:
    # `quiver eval` belongs to training/ too (`training.eval_cli.add_eval_parser`).
    if importlib.util.find_spec("training.eval_cli") is None:
        return
    from training import eval_cli

    eval_cli.add_eval_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    from server.version import VERSION

    parser = argparse.ArgumentParser(prog="quiver", description="Quiver: one base model, many LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"quiver {VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(subparsers)
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)
    return parser


def engine_config(args: argparse.Namespace, model: str) -> Any:
    from engine.config import EngineConfig

    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_waiting=args.max_waiting,
        seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
        async_scheduling=not args.no_async_scheduling,
        mixed_steps=args.mixed_steps,
    )


def adapter_config(args: argparse.Namespace) -> Any:
    from adapters.config import AdapterConfig

    if args.max_cpu_adapters is not None and args.max_cpu_adapters < args.max_loras:
        raise ValueError(f"--max-cpu-adapters ({args.max_cpu_adapters}) must be at least --max-loras "
                         f"({args.max_loras}): an adapter on the GPU keeps its host copy")
    root = Path(args.adapter_root) if args.adapter_root else None
    return AdapterConfig(max_cpu_adapters=args.max_cpu_adapters, adapter_root=root,
                         refuse_base_mismatch=args.refuse_base_mismatch)


def engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """What builds the engine (in a worker thread, after the server listens)."""
    adapters = dict(args.adapters if args.adapters is not None else args.adapter_defaults)
    adapter_settings = adapter_config(args)  # fail before listening on a bad option
    config = engine_config(args, args.model or "demo")  # fail before listening on a bad option
    chat_template = read_chat_template(args.chat_template) if args.chat_template else None

    def build() -> Any:
        from engine.async_engine import AsyncEngine

        if args.model is not None:
            engine = AsyncEngine(config, adapters=adapters, served_model_name=args.served_model_name,
                                 adapter_config=adapter_settings)
        else:
            from engine.demo import DEMO_MODEL_NAME, ensure_demo_bundle

            bundle = ensure_demo_bundle()
            demo_adapters = {**bundle.adapters, **adapters}
            engine = AsyncEngine(engine_config(args, str(bundle.model_dir)), adapters=demo_adapters,
                                 served_model_name=args.served_model_name or DEMO_MODEL_NAME,
                                 adapter_config=adapter_settings)
        if chat_template is not None:
            engine.tokenizer.chat_template = chat_template  # what every prompt is rendered with
        return engine

    return build


def _stateful(args: argparse.Namespace, state: Any, admin_routes: list[Any], metrics: Any) -> Any:
    """Fine-tuning jobs, deployments and the `seekrai` routes, with what they keep across restarts."""
    from server.wiring import build_stateful, served_base

    base_model, model_name = served_base(args.model, args.served_model_name)
    if args.jobs_dir:
        jobs_dir = Path(args.jobs_dir).expanduser()
    else:  # one directory per model: adapters trained on one base do not fit another
        from engine.demo import default_cache_dir

        jobs_dir = default_cache_dir() / "jobs" / model_name.replace("/", "--")
    state_db = Path(args.state_db).expanduser() if args.state_db else None
    return build_stateful(state, admin_routes, jobs_dir=jobs_dir, base_model=base_model, model_name=model_name,
                          state_db=state_db, metrics=metrics)


def run_serve(args: argparse.Namespace) -> int:
    from server.admin.adapters import adapter_routes
    from server.app import create_app
    from server.http.logging import configure_logging
    from server.http.metrics import Metrics
    from server.http.shutdown import serve
    from server.limits import Limits
    from server.openai.schemas import MAX_TOP_LOGPROBS
    from server.state import ServerState

    try:
        configure_logging(args.log_level, args.log_format)
        factory = engine_factory(args)
        limits = Limits(max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens=args.max_tokens_ceiling, max_concurrent_requests=args.max_concurrent_requests)
        metrics = Metrics(max_adapter_labels=args.metrics_max_adapters)
        if args.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
        if not 0 <= args.max_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"--max-logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {args.max_logprobs}")
        if args.tool_call_parser is not None:
            from server.openai.tool_parsers import parser_named

            parser_named(args.tool_call_parser)  # ValueError naming the known parsers
    except ValueError as exc:
        print(f"quiver serve: {exc}", file=sys.stderr)
        return 2
    state = ServerState(engine_factory=factory)
    state.max_logprobs = args.max_logprobs
    state.tool_call_parser = args.tool_call_parser
    try:
        stateful = _stateful(args, state, adapter_routes(state), metrics)
    except (ValueError, RuntimeError) as exc:  # a bad jobs directory or state database
        print(f"quiver serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(state, api_key=args.api_key, admin_key=args.admin_key, protect_metrics=args.protect_metrics,
                     limits=limits, metrics=metrics, stateful=stateful,
                     allowed_origins=parse_allowed_origins(args.allowed_origins))

    def fatal() -> str | None:  # a model that cannot load never will: exit for the orchestrator to see
        return None if state.load_error is None else f"the model could not be loaded: {state.load_error}"

    return serve(app, host=args.host, port=args.port, log_level=args.log_level,
                 shutdown_timeout=args.shutdown_timeout, fatal=fatal)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
