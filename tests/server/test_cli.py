"""The `quiver` command line: options, environment variables, the demo default, a real launch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from server import cli
from tests.server.helpers import wait_until_serving

REPO = Path(__file__).resolve().parents[2]


def _parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_help_explains_every_option():
    # `python -m server` is the `quiver` command.
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=True)
    for flag, _, _, _ in cli._SERVE_OPTIONS:
        assert flag in result.stdout and cli.env_name(flag) in result.stdout
    assert "--adapter NAME=PATH" in result.stdout and "QUIVER_ADAPTERS" in result.stdout
    assert "--lora-modules NAME=PATH" in result.stdout and "always enabled" in result.stdout  # --enable-lora


def test_top_level_help_lists_serve(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "serve" in capsys.readouterr().out


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("QUIVER_PORT", "9100")
    monkeypatch.setenv("QUIVER_MODEL", "/models/from-env")
    monkeypatch.setenv("QUIVER_MAX_LORAS", "3")
    monkeypatch.setenv("QUIVER_ADAPTERS", "a=/x/a, b=/x/b")
    args = _parse()
    assert (args.port, args.model, args.max_loras) == (9100, "/models/from-env", 3)
    assert args.adapters is None and args.adapter_defaults == [("a", Path("/x/a")), ("b", Path("/x/b"))]
    args = _parse("--port", "9200", "--model", "/models/flag", "--adapter", "c=/x/c", "--adapter", "d=/x/d")
    assert (args.port, args.model, args.max_loras) == (9200, "/models/flag", 3)
    assert args.adapters == [("c", Path("/x/c")), ("d", Path("/x/d"))]


def test_defaults_without_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("QUIVER_"):
            monkeypatch.delenv(name)
    args = _parse()
    assert (args.host, args.port, args.model) == (cli.DEFAULT_HOST, cli.DEFAULT_PORT, None)
    config = cli.engine_config(_parse("--max-model-len", "512", "--dtype", "float32"), "m")
    assert (config.max_model_len, config.dtype, config.model) == (512, "float32", "m")
    assert config.async_scheduling


def test_async_scheduling_can_be_turned_off(monkeypatch):
    assert not cli.engine_config(_parse("--no-async-scheduling"), "m").async_scheduling
    monkeypatch.setenv("QUIVER_NO_ASYNC_SCHEDULING", "1")
    assert not cli.engine_config(_parse(), "m").async_scheduling


@pytest.mark.parametrize("argv", [["--adapter", "no-equals"], ["--adapter", "=path"], ["--port", "eighty"]])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_bad_environment_value_is_named(monkeypatch, capsys):
    monkeypatch.setenv("QUIVER_MAX_NUM_SEQS", "many")
    with pytest.raises(SystemExit):
        _parse()
    assert "QUIVER_MAX_NUM_SEQS" in capsys.readouterr().err


def test_no_model_serves_the_demo_bundle_with_its_adapters(monkeypatch, server_model_dir, server_adapters):
    import engine.demo
    from engine.demo import DemoBundle

    names = list(server_adapters)[:2]
    bundle = DemoBundle(model_dir=server_model_dir, adapters={n: server_adapters[n] for n in names})
    monkeypatch.setattr(engine.demo, "ensure_demo_bundle", lambda cache_dir=None: bundle)
    extra = list(server_adapters)[2]
    for name in list(os.environ):
        if name.startswith("QUIVER_"):
            monkeypatch.delenv(name)
    args = _parse("--adapter", f"{extra}={server_adapters[extra]}", "--device", "cpu", "--max-model-len", "128")
    built = cli.engine_factory(args)()
    assert built.model_name == engine.demo.DEMO_MODEL_NAME
    assert sorted(built.adapter_names()) == sorted([*names, extra])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_launches_a_working_server(server_model_dir, server_adapters, tmp_path):
    port = _free_port()
    adapter = next(iter(server_adapters))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    env.update(QUIVER_MAX_MODEL_LEN="128", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(server_model_dir), "--port", str(port),
         "--served-model-name", "cli-base", "--adapter", f"{adapter}={server_adapters[adapter]}",
         "--device", "cpu", "--log-level", "warning", "--jobs-dir", str(tmp_path / "jobs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base_url = wait_until_serving(f"http://127.0.0.1:{port}", process, log=lambda: _output(process))
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-base", adapter]
        answer = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)
        assert answer.model == adapter and answer.usage.completion_tokens >= 1
        assert answer.usage.prompt_tokens + 4 <= 128
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        process.stdout.close()
    assert process.returncode == 0


def _serve_until_exit(argv: list[str], tmp_path: Path, timeout: float = 90.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    env.update(PYTHONPATH=str(REPO), QUIVER_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", str(_free_port()), "--log-level", "warning",
         "--jobs-dir", str(tmp_path / "jobs"), *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_a_model_that_cannot_load_exits_non_zero_with_the_reason(tmp_path):
    missing = tmp_path / "no-such-model"
    done = _serve_until_exit(["--model", str(missing), "--device", "cpu"], tmp_path)
    assert done.returncode != 0, done.stderr
    reason = done.stderr.strip().splitlines()[-1]
    assert reason.startswith("quiver serve: the model could not be loaded:") and str(missing) in reason


def test_a_device_that_cannot_be_used_exits_non_zero_with_the_reason(server_model_dir, tmp_path):
    done = _serve_until_exit(["--model", str(server_model_dir), "--device", "nosuchdevice"], tmp_path)
    assert done.returncode != 0, done.stderr
    reason = done.stderr.strip().splitlines()[-1]
    assert reason.startswith("quiver serve: ") and "nosuchdevice" in reason


# ---- vLLM's spellings and the OpenAI surface's options ----------------------------------------------


def test_version_flag(capsys):
    from server.version import VERSION

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"quiver {VERSION}"


def test_lora_modules_in_both_forms_add_to_adapter(monkeypatch):
    monkeypatch.delenv("QUIVER_ADAPTERS", raising=False)
    args = _parse("--adapter", "a=/x/a", "--lora-modules", "b=/x/b",
                  '{"name": "c", "path": "/x/c", "base_model_name": "some/base"}', "--enable-lora")
    assert args.adapters == [("a", Path("/x/a")), ("b", Path("/x/b")), ("c", Path("/x/c"))]
    assert args.enable_lora
    assert _parse("--lora-modules", "d=hf://org/d").adapters == [("d", "hf://org/d")]


@pytest.mark.parametrize("item", ['{"name": "x"}', '{"name": "x", "path": 3}', "{not json", "no-equals", "[1]"])
def test_bad_lora_modules_exit_with_usage(item, capsys):
    with pytest.raises(SystemExit) as info:
        _parse("--lora-modules", item)
    assert info.value.code == 2
    assert "--lora-modules" in capsys.readouterr().err


def test_chat_template_from_a_file_or_inline(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert cli.read_chat_template(str(path)) == template
    assert cli.read_chat_template(template) == template
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        cli.read_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        cli.read_chat_template("{% for m in messages %}")


def test_allowed_origins_parsing():
    assert cli.parse_allowed_origins(None) == []
    assert cli.parse_allowed_origins(" https://a.example , https://b.example,") == ["https://a.example",
                                                                                    "https://b.example"]
    assert cli.parse_allowed_origins("https://a.example,*") == ["*"]


def test_max_logprobs_out_of_range_exits_before_serving(server_model_dir, tmp_path):
    done = _serve_until_exit(["--model", str(server_model_dir), "--device", "cpu", "--max-logprobs", "21"], tmp_path)
    assert done.returncode == 2
    assert "--max-logprobs must be between 0 and 20, got 21" in done.stderr


def test_vllm_spellings_launch_a_working_server(server_model_dir, server_adapters, tmp_path):
    first, second = list(server_adapters)[:2]
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    env.update(QUIVER_MAX_MODEL_LEN="128", PYTHONPATH=str(REPO))
    module = json.dumps({"name": first, "path": str(server_adapters[first]), "base_model_name": "cli-base"})
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(server_model_dir), "--port", str(port),
         "--served-model-name", "cli-base", "--enable-lora", "--lora-modules", module,
         f"{second}={server_adapters[second]}", "--chat-template", str(template), "--max-logprobs", "2",
         "--allowed-origins", "https://app.example", "--device", "cpu", "--log-level", "warning",
         "--jobs-dir", str(tmp_path / "jobs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base_url = wait_until_serving(f"http://127.0.0.1:{port}", process, log=lambda: _output(process))
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-base", first, second]
        messages = [{"role": "user", "content": "hi"}]
        tokens = httpx.post(f"{base_url}/tokenize", json={"model": second, "messages": messages}).json()["tokens"]
        prompt = httpx.post(f"{base_url}/detokenize", json={"tokens": tokens}).json()["prompt"]
        assert prompt == "<<user>>hi\n<<assistant>>"  # the template given, not the tokenizer's
        answer = client.chat.completions.create(model=first, messages=messages, max_tokens=2, logprobs=True,
                                                top_logprobs=2)
        assert answer.usage.prompt_tokens == len(tokens)
        with pytest.raises(openai.BadRequestError, match="--max-logprobs"):
            client.chat.completions.create(model=first, messages=messages, max_tokens=2, logprobs=True,
                                           top_logprobs=3)
        preflight = httpx.options(f"{base_url}/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert httpx.get(f"{base_url}/version").json()["version"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        process.stdout.close()
    assert process.returncode == 0


def _output(process: subprocess.Popen) -> str:
    return process.stdout.read() if process.stdout else ""
