"""The soak rounds and their invariants (the CLI is load_tests/soak.py).

Invariants, each a named check in the report:
  health          GET /health answers 200 within 5 s, polled all the time.
  no_5xx          no 5xx anywhere except the documented one: 503 with Retry-After (overload,
                  not ready, adapter unavailable).
  invalid_4xx     every invalid request gets a 4xx in the OpenAI error envelope.
  outputs         every valid request's text equals its reference (temperature 0, taken one at a
                  time before the first round); a copy of an adapter registered under a new name
                  answers like the original; a stream running while its adapter is deleted finishes
                  with the same text. With a tie tolerance, a text that differs is accepted (and
                  counted) where the tokens part at a near-tie of the reference (greedy_match.py).
  churn           register/promote/demote/delete answer 2xx and a deleted adapter answers 404.
  broken_adapter  a broken adapter never answers 2xx for a request, and fails only its own requests.
  kv_free         once idle, every KV block is free.
  refcounts       once idle, every adapter's reference count is zero.
  memory_flat     server RSS (and GPU memory allocated) grows by at most a tolerance between the
                  first round after warm-up and the last.
  adapter_churn   with churn adapters (churn.py): every request to one answers 200 with finish reason
                  stop or length, GPU and host evictions happened during the rounds, no churn adapter
                  ends failed; their outputs match references taken after the rounds.
Checks without a data source are reported as skipped, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import openai

from load_tests.chaos import BROKEN_KINDS, RawRequest, copy_adapter, fuzzed_bodies, invalid_requests
from load_tests.churn import AdapterChurn, ChurnConfig
from load_tests.client import check_loopback
from load_tests.greedy_match import Match, Step, compare_greedy, logprob_args, steps_of
from load_tests.metrics import ServerProbe, process_rss_bytes

PROMPTS = ("What is a quiver?", "Tell me about the sea.", "Name three colours.", "How do birds fly?")
ENVELOPE_KEYS = {"message", "type", "param", "code"}


@dataclass
class SoakConfig:
    base_url: str
    api_key: str = "none"
    duration_s: float = 60.0
    max_rounds: int = 1000
    round_s: float = 5.0
    valid_per_round: int = 12
    invalid_per_round: int = 6
    fuzz_per_round: int = 4
    disconnects_per_round: int = 4
    max_tokens: int = 16
    num_adapters: int = 4
    adapter_root: Path | None = None
    adapter_sources: dict[str, Path] = field(default_factory=dict)
    rss_tolerance_bytes: int = 64 << 20
    gpu_tolerance_bytes: int = 16 << 20
    warmup_rounds: int = 1
    request_timeout_s: float = 60.0
    health_interval_s: float = 0.25
    seed: int = 0
    pid: int | None = None
    engine: Any = None
    exact_metrics: dict[str, str] = field(default_factory=dict)
    tie_tolerance: float = 0.0  # nats; 0: every output must equal its reference exactly
    churn: ChurnConfig | None = None  # adapters loaded on demand under load (churn.py)


class Reply(NamedTuple):
    text: str
    steps: list[Step]
    finish_reason: str | None


class Ledger:
    """Counts by traffic kind and status, violations by check, skipped checks with reasons."""

    def __init__(self) -> None:
        self.round = -1
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.violations: list[dict[str, Any]] = []
        self.failed: Counter[str] = Counter()
        self.skipped: dict[str, str] = {}
        self.near_ties: list[dict[str, Any]] = []

    def count(self, kind: str, status: int | str) -> None:
        self.counts[kind][str(status)] += 1

    def violate(self, check: str, detail: str) -> None:
        self.failed[check] += 1
        self.violations.append({"round": self.round, "kind": check, "detail": detail[:500]})

    def near_tie(self, kind: str, what: str, match: Match) -> None:
        self.count("near_tie", kind)
        self.near_ties.append({"round": self.round, "request": what, "index": match.index, "gap": match.gap,
                               "detail": match.detail[:300]})

    def checks(self, names: tuple[str, ...]) -> dict[str, str]:
        return {n: (f"failed ({self.failed[n]})" if self.failed[n] else
                    f"skipped: {self.skipped[n]}" if n in self.skipped else "passed") for n in names}


CHECKS = ("health", "no_5xx", "invalid_4xx", "outputs", "churn", "broken_adapter", "kv_free", "refcounts",
          "memory_flat", "adapter_churn")


def documented_5xx(status: int, headers: httpx.Headers) -> bool:
    return status == 503 and "retry-after" in headers


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        check_loopback(cfg.base_url)
        self.cfg = cfg
        self.ledger = Ledger()
        self.rng = np.random.default_rng(cfg.seed)
        self.http = httpx.AsyncClient(base_url=cfg.base_url, timeout=cfg.request_timeout_s,
                                      headers={"Authorization": f"Bearer {cfg.api_key}"})
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url + "/v1", api_key=cfg.api_key, max_retries=0,
                                         timeout=cfg.request_timeout_s)
        self.probe = ServerProbe(cfg.base_url, api_key=cfg.api_key, engine=cfg.engine, exact=cfg.exact_metrics)
        self.refs: dict[tuple[str, int, str], str] = {}
        self.ref_steps: dict[tuple[str, int, str], list[Step]] = {}
        self.adapter_churn: AdapterChurn | None = None
        self.models: list[str] = []
        self.admin = False
        self.health_max_s = 0.0

    # ----------------------------------------------------------------- requests
    async def generate(self, model: str, prompt: int, endpoint: str, stream: bool) -> tuple[str, list[Step]]:
        """The text, and with a tie tolerance the tokens with their logprobs (else [])."""
        reply = await self.generate_full(model, prompt, endpoint, stream)
        return reply.text, reply.steps

    async def generate_full(self, model: str, prompt: int, endpoint: str, stream: bool) -> Reply:
        """`generate`'s text and tokens, with the finish reason (a stream's last one)."""
        common: dict[str, Any] = dict(model=model, temperature=0, max_tokens=self.cfg.max_tokens, stream=stream)
        if self.cfg.tie_tolerance > 0:
            common.update(logprob_args(endpoint))
        if endpoint == "chat":
            result: Any = await self.client.chat.completions.create(
                messages=[{"role": "user", "content": PROMPTS[prompt]}], **common)
        else:
            result = await self.client.completions.create(prompt=PROMPTS[prompt], **common)
        if not stream:
            choice = result.choices[0]
            text = (choice.message.content or "") if endpoint == "chat" else choice.text
            return Reply(text, steps_of(endpoint, choice.logprobs), choice.finish_reason)
        parts, steps, finish = [], [], None
        async for chunk in result:
            for c in chunk.choices:
                parts.append((c.delta.content if endpoint == "chat" else c.text) or "")
                steps += steps_of(endpoint, c.logprobs)
                finish = c.finish_reason or finish
        return Reply("".join(parts), steps, finish)

    def check_output(self, kind: str, what: str, text: str, steps: list[Step], key: tuple[str, int, str]) -> None:
        want = self.refs[key]
        if text == want:
            return
        detail = f"{what}: got {text!r}, reference {want!r}"
        if self.cfg.tie_tolerance > 0:
            match = compare_greedy(self.ref_steps.get(key, []), steps, self.cfg.tie_tolerance)
            if match.outcome == "near_tie":
                self.ledger.near_tie(kind, what, match)
                return
            detail += f"; {match.detail}" if match.outcome == "mismatch" else "; the tokens agree, the texts do not"
        self.ledger.violate("outputs", detail)

    def _api_error(self, kind: str, exc: Exception, what: str) -> None:
        if isinstance(exc, openai.APIStatusError):
            self.ledger.count(kind, exc.status_code)
            if documented_5xx(exc.status_code, exc.response.headers):
                return
            if exc.status_code >= 500:
                self.ledger.violate("no_5xx", f"{what}: {exc.status_code} {exc.message}")
            self.ledger.violate("outputs", f"{what} failed: {exc.status_code} {exc.message}")
        else:
            self.ledger.count(kind, type(exc).__name__)
            self.ledger.violate("outputs", f"{what} failed: {type(exc).__name__}: {exc}")

    async def valid(self, model: str, prompt: int, endpoint: str, stream: bool, ref_model: str | None = None,
                    kind: str = "valid") -> None:
        what = f"{kind} {model} {endpoint} stream={stream} prompt={prompt}"
        try:
            text, steps = await self.generate(model, prompt, endpoint, stream)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            self._api_error(kind, exc, what)
            return
        self.ledger.count(kind, 200)
        self.check_output(kind, what, text, steps, (ref_model or model, prompt, endpoint))

    async def raw(self, req: RawRequest, must_refuse: bool) -> None:
        try:
            response = await self.http.post(req.path, content=req.body, headers={"content-type": req.content_type})
        except httpx.HTTPError as exc:
            self.ledger.count("invalid" if must_refuse else "fuzz", type(exc).__name__)
            self.ledger.violate("no_5xx", f"{req.kind}: no answer ({type(exc).__name__}: {exc})")
            return
        status = response.status_code
        self.ledger.count("invalid" if must_refuse else "fuzz", status)
        if status >= 500 and not documented_5xx(status, response.headers):
            self.ledger.violate("no_5xx", f"{req.kind}: {status} {response.text[:200]}")
        elif must_refuse and not 400 <= status < 500:
            self.ledger.violate("invalid_4xx", f"{req.kind}: answered {status}")
        elif status >= 400:
            try:
                error = response.json()["error"]
                missing = ENVELOPE_KEYS - set(error)
            except (ValueError, KeyError, TypeError):
                missing = ENVELOPE_KEYS
            if missing:
                self.ledger.violate("invalid_4xx", f"{req.kind}: {status} without the error envelope "
                                                   f"(missing {sorted(missing)}): {response.text[:200]}")

    async def disconnect(self, model: str, after_chunks: int) -> None:
        """Drop a stream after `after_chunks` chunks; -1 gives up 10 ms into any read, which is
        usually before the response headers (the server sends them with the first token)."""
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True,
                "max_tokens": 64, "temperature": 0}
        if after_chunks < 0:
            with contextlib.suppress(httpx.TimeoutException):
                await self.http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(5.0, read=0.01))
            self.ledger.count("disconnect", "read_timeout_10ms")
            return
        try:
            stream: Any = await self.client.chat.completions.create(**body)
            chunks = stream.__aiter__()
            try:
                for _ in range(after_chunks):
                    await chunks.__anext__()
            except StopAsyncIteration:
                pass
            finally:
                # Close the chunk generator before the response, so that it is not finalized later
                # by the garbage collector while the connection is already gone.
                await chunks.aclose()
                await stream.close()
            self.ledger.count("disconnect", f"after_{after_chunks}_chunks")
        except Exception as exc:  # noqa: BLE001
            self._api_error("disconnect", exc, f"stream to drop ({model})")

    # -------------------------------------------------------------------- churn
    async def admin_call(self, method: str, path: str, expect_2xx: bool, **kw: Any) -> httpx.Response | None:
        try:
            response = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.ledger.violate("churn", f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.ledger.count("admin", f"{method} {response.status_code}")
        if response.status_code >= 500 and not documented_5xx(response.status_code, response.headers):
            self.ledger.violate("no_5xx", f"{method} {path}: {response.status_code} {response.text[:200]}")
        elif expect_2xx and not 200 <= response.status_code < 300:
            self.ledger.violate("churn", f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response

    async def churn(self, round_index: int) -> None:
        root = self.cfg.adapter_root
        sources = [m for m in self.models[1:] if m in self.cfg.adapter_sources]
        if root is None or not sources:
            return
        source = sources[round_index % len(sources)]
        name = f"churn-r{round_index}"
        path = copy_adapter(self.cfg.adapter_sources[source], root / f"{name}-files")
        registered = await self.admin_call("POST", "/v1/adapters", True,
                                           json={"name": name, "source": str(path.relative_to(root))})
        if registered is None:
            return
        await self.valid(name, 0, "chat", False, ref_model=source, kind="churn")
        await self.admin_call("POST", f"/v1/adapters/{name}/promote", True)
        await self.valid(name, 1, "chat", True, ref_model=source, kind="churn")
        await self.admin_call("POST", f"/v1/adapters/{name}/demote", True)
        await self.valid(name, 2, "completions", False, ref_model=source, kind="churn")
        await self.delete_during_stream(name, source)
        try:
            await self.generate(name, 0, "chat", False)
            self.ledger.violate("churn", f"{name} still answers after DELETE")
        except openai.NotFoundError:
            self.ledger.count("churn", "404_after_delete")
        except Exception as exc:  # noqa: BLE001
            self._api_error("churn", exc, f"{name} after DELETE")
        await self.broken(round_index)

    async def delete_during_stream(self, name: str, source: str) -> None:
        extra = logprob_args("chat") if self.cfg.tie_tolerance > 0 else {}
        stream: Any = await self.client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPTS[3]}], temperature=0,
            max_tokens=self.cfg.max_tokens, stream=True, **extra)
        parts: list[str] = []
        steps: list[Step] = []
        deleted = False
        async for chunk in stream:
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                steps += steps_of("chat", c.logprobs)
            if not deleted and any(parts):
                await self.admin_call("DELETE", f"/v1/adapters/{name}", True)
                deleted = True
        self.check_output("churn", f"stream on {name} deleted mid-stream", "".join(parts), steps, (source, 3, "chat"))

    async def broken(self, round_index: int) -> None:
        kind = BROKEN_KINDS[round_index % len(BROKEN_KINDS)]
        name = f"{kind}-r{round_index}"
        path = self.cfg.adapter_root / kind  # type: ignore[operator]
        response = await self.admin_call("POST", "/v1/adapters", False, json={"name": name, "source": kind})
        if response is None:
            return
        for hostile in ("../" + kind, str(path), "/etc"):  # sources outside the adapter root
            refused = await self.admin_call("POST", "/v1/adapters", False,
                                            json={"name": f"{name}-escape", "source": hostile})
            if refused is not None and not 400 <= refused.status_code < 500:
                self.ledger.violate("churn", f"source {hostile!r} outside the root answered {refused.status_code}")
        for model in (name, kind):  # the registered name, and the name discovery gives the directory
            try:
                await self.generate(model, 0, "chat", False)
                self.ledger.violate("broken_adapter", f"{model} ({kind}) answered 200")
            except openai.APIStatusError as exc:
                self.ledger.count("broken", exc.status_code)
                if exc.status_code >= 500 and not documented_5xx(exc.status_code, exc.response.headers):
                    self.ledger.violate("no_5xx", f"request to broken {model}: {exc.status_code} {exc.message}")

    # ------------------------------------------------------------------ rounds
    async def health(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await self.http.get("/health", timeout=5.0)
                if response.status_code != 200:
                    self.ledger.violate("health", f"/health answered {response.status_code}")
            except httpx.HTTPError as exc:
                self.ledger.violate("health", f"/health failed: {type(exc).__name__}: {exc}")
            self.health_max_s = max(self.health_max_s, time.perf_counter() - started)
            self.ledger.count("health", "checked")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.health_interval_s)

    async def delayed(self, coro: Any) -> None:
        await asyncio.sleep(float(self.rng.uniform(0, self.cfg.round_s)))
        await coro

    def round_tasks(self, index: int) -> list[Any]:
        cfg, rng = self.cfg, self.rng
        pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
        churn = self.adapter_churn
        on_demand = churn.round_requests(rng, cfg.valid_per_round, len(PROMPTS)) if churn else []
        work = [self.valid(pick(self.models), int(rng.integers(len(PROMPTS))), pick(("chat", "completions")),
                           bool(rng.integers(2))) for _ in range(cfg.valid_per_round - len(on_demand))]
        work += [churn.request(*request) for request in on_demand] if churn else []
        # In turn rather than at random, so that a run of enough rounds tries every case.
        invalid = invalid_requests(self.models[0])
        first = index * cfg.invalid_per_round
        work += [self.raw(invalid[(first + k) % len(invalid)], True) for k in range(cfg.invalid_per_round)]
        work += [self.raw(r, False) for r in fuzzed_bodies(self.models[0], rng, cfg.fuzz_per_round)]
        work += [self.disconnect(pick(self.models), int(rng.integers(-1, 4))) for _ in range(cfg.disconnects_per_round)]
        tasks = [self.delayed(w) for w in work]
        if self.admin:
            tasks.append(self.churn(index))
        return tasks

    async def idle_state(self) -> dict[str, Any]:
        """The probe's reading once idle: poll up to 5 s for the KV and refcount invariants to settle."""
        deadline = time.monotonic() + 5.0
        while True:
            state = await asyncio.to_thread(self.probe.read)
            settled = (state["kv_blocks_free"] == state["kv_blocks_total"]
                       and not state["adapter_refcount"] and not any((state["refcounts"] or {}).values()))
            if settled or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.1)

    def check_state(self, state: dict[str, Any]) -> None:
        if state["kv_blocks_free"] is None or state["kv_blocks_total"] is None:
            self.ledger.skipped["kv_free"] = "no KV block counts: " + self.probe.missing()
        elif state["kv_blocks_free"] != state["kv_blocks_total"]:
            self.ledger.violate("kv_free", f"{state['kv_blocks_free']} of {state['kv_blocks_total']} blocks free")
        if state["adapter_refcount"] is None and state["refcounts"] is None:
            self.ledger.skipped["refcounts"] = "no adapter reference counts: " + self.probe.missing()
        else:
            held = {k: v for k, v in (state["refcounts"] or {}).items() if v}
            if state["adapter_refcount"] or held:
                self.ledger.violate("refcounts", f"total {state['adapter_refcount']}, held {held}")

    def check_memory(self, rounds: list[dict[str, Any]]) -> None:
        steady = rounds[self.cfg.warmup_rounds:]
        for key, tolerance in (("rss_bytes", self.cfg.rss_tolerance_bytes),
                               ("gpu_memory_allocated_bytes", self.cfg.gpu_tolerance_bytes)):
            values = [r[key] for r in steady if r[key] is not None]
            if len(values) < 2:
                if key == "rss_bytes":
                    self.ledger.skipped["memory_flat"] = (f"{len(values)} rounds after warm-up with an RSS "
                                                          "reading; need 2")
                continue
            growth = max(values[1:]) - values[0]
            if growth > tolerance:
                self.ledger.violate("memory_flat", f"{key} grew {growth / 2**20:.1f} MiB over {len(values)} "
                                                   f"rounds (tolerance {tolerance / 2**20:.0f} MiB)")

    async def setup(self) -> None:
        body = (await self.http.get("/v1/models")).json()
        names = [m["id"] for m in body["data"]]
        # Adapters this run made (or breaks) on purpose are never valid traffic.
        usable = [n for n in names[1:] if not n.startswith(("broken-", "churn-"))]
        self.models = [names[0]] + usable[: self.cfg.num_adapters]
        for model in self.models:  # references: one request at a time, nothing else running
            for prompt in range(len(PROMPTS)):
                for endpoint in ("chat", "completions"):
                    key = (model, prompt, endpoint)
                    self.refs[key], self.ref_steps[key] = await self.generate(model, prompt, endpoint, False)
        probe = await self.http.get("/v1/adapters")
        self.admin = probe.status_code == 200
        if not self.admin:
            reason = f"GET /v1/adapters answered {probe.status_code}: no adapter admin API yet"
            self.ledger.skipped["churn"] = self.ledger.skipped["broken_adapter"] = reason
        elif self.cfg.adapter_root is None:
            reason = "no adapter root to put adapter copies in (server option --adapter-root missing or not given)"
            self.ledger.skipped["churn"] = self.ledger.skipped["broken_adapter"] = reason
            self.admin = False
        if self.cfg.churn is None:
            self.ledger.skipped["adapter_churn"] = "no churn adapters asked for (--churn-adapters 0)"
        elif self.cfg.adapter_root is None:
            self.ledger.skipped["adapter_churn"] = "no adapter root to write churn adapters into"
        else:  # written only now, after the references: the traffic is the first to load them
            self.adapter_churn = AdapterChurn(self.cfg.churn, self)
            await self.adapter_churn.prepare(self.cfg.adapter_root)

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        await self.setup()
        started = time.monotonic()
        stop = asyncio.Event()
        watcher = asyncio.create_task(self.health(stop))
        rounds: list[dict[str, Any]] = []
        try:
            for index in range(cfg.max_rounds):
                elapsed = time.monotonic() - started
                if index and elapsed + cfg.round_s > cfg.duration_s:
                    break
                self.ledger.round, self.health_max_s = index, 0.0
                budget = max(1.0, cfg.duration_s - elapsed) + cfg.request_timeout_s
                tasks = [asyncio.ensure_future(t) for t in self.round_tasks(index)]
                _, late = await asyncio.wait(tasks, timeout=budget)
                for task in late:
                    task.cancel()
                    self.ledger.violate("outputs", "a request outlived the round's time budget")
                state = await self.idle_state()
                self.check_state(state)
                rss = process_rss_bytes(cfg.pid) if cfg.pid is not None else None
                rounds.append({"round": index, "rss_bytes": rss, "health_max_ms": self.health_max_s * 1000,
                               **{k: state[k] for k in ("kv_blocks_free", "kv_blocks_total", "adapter_refcount",
                                                        "gpu_memory_allocated_bytes")}})
            churn = await self.adapter_churn.finish() if self.adapter_churn else None
        finally:
            stop.set()
            await watcher
            await self.http.aclose()
            await self.client.close()
        self.check_memory(rounds)
        result = {"checks": self.ledger.checks(CHECKS), "violations": self.ledger.violations,
                  "counts": {k: dict(v) for k, v in self.ledger.counts.items()}, "rounds": rounds,
                  "elapsed_s": time.monotonic() - started, "models": self.models,
                  "state_sources": self.probe.sources, "state_notes": dict(self.probe.notes)}
        if churn is not None:
            result["adapter_churn"] = churn
            if result["checks"]["adapter_churn"] == "passed":
                evicted = churn["evictions"]
                result["checks"]["adapter_churn"] = (
                    f"passed ({sum(churn['requests'].values())} requests to {churn['adapters_used']} adapters; "
                    f"evictions gpu {evicted['gpu']:.0f}, host {evicted['host']:.0f})")
        if cfg.tie_tolerance > 0:
            result["near_tie"] = self.near_tie_summary()
            if result["near_tie"]["accepted"] and result["checks"]["outputs"] == "passed":
                result["checks"]["outputs"] = (f"passed ({result['near_tie']['accepted']} diverged at a near-tie, "
                                               f"largest gap {result['near_tie']['max_gap_nats']:.4g} nats)")
        return result

    def near_tie_summary(self) -> dict[str, Any]:
        ties = self.ledger.near_ties
        return {"tolerance_nats": self.cfg.tie_tolerance, "accepted": len(ties),
                "max_gap_nats": max((t["gap"] for t in ties), default=None), "examples": ties[:50]}


async def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    return await Soak(cfg).run()
