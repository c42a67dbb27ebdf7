"""Adapter churn under load: more adapters than GPU and host slots, each loaded on first use.

`write_churn_adapters` puts N synthetic PEFT adapters of mixed ranks and target sets into the
server's adapter root once the soak's references are taken, so none is registered or loaded
before the traffic starts: a churn adapter's first request discovers and loads it from disk.
`round_adapters` picks a round's adapters so that the round touches more adapters than there are
host slots (and so more than GPU slots): both tiers evict all run long. `AdapterChurn` sends the
churn requests, keeps their answers, and at the end takes their references one request at a time
(after the load, so nothing is warmed before it), compares, and reads the evictions and the
adapters' states for the `adapter_churn` check.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
from prometheus_client.parser import text_string_to_metric_families

from load_tests.greedy_match import Step
from load_tests.synthetic_adapters import write_adapter

if TYPE_CHECKING:
    from load_tests.soak_run import Soak

CHURN_PREFIX = "churn-lora-"
RANKS = (4, 8, 16)
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all7": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
NORMAL_FINISH = frozenset({"stop", "length"})
POPULARITIES = ("uniform", "zipf")
ZIPF_EXPONENT = 1.0


@dataclass(frozen=True)
class ChurnConfig:
    """`adapters` on-demand adapters of `model_dir`'s shape; the server has `gpu_slots` GPU LoRA
    slots and keeps `host_slots` adapters in host memory; `share` of each round's valid requests
    go to churn adapters, picked `popularity` ("uniform", or "zipf" with exponent 1 over a fixed
    random order, topped up with unused adapters until the round touches more than `host_slots`)."""

    adapters: int
    model_dir: Path
    gpu_slots: int
    host_slots: int
    share: float = 0.5
    popularity: str = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gpu_slots < 1 or self.host_slots < self.gpu_slots:
            raise ValueError(f"need 1 <= GPU slots <= host slots, got {self.gpu_slots} and {self.host_slots}")
        if self.adapters <= self.host_slots:
            raise ValueError(f"{self.adapters} churn adapters do not exceed the {self.host_slots} host slots")
        if not 0 < self.share <= 1:
            raise ValueError(f"the churn share must be in (0, 1], got {self.share}")
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}, got {self.popularity!r}")

    def requests_per_round(self, valid_per_round: int) -> int:
        return round(valid_per_round * self.share)

    def check_round(self, valid_per_round: int) -> None:
        """Raise unless a round sends enough churn requests to touch more adapters than host slots."""
        count = self.requests_per_round(valid_per_round)
        if count <= self.host_slots:
            raise ValueError(f"{count} churn requests per round ({valid_per_round} valid x share {self.share}) "
                             f"cannot touch more adapters than the {self.host_slots} host slots")

    @property
    def names(self) -> list[str]:
        width = max(4, len(str(self.adapters - 1)))
        return [f"{CHURN_PREFIX}{i:0{width}d}" for i in range(self.adapters)]


def churn_shape(index: int) -> tuple[int, str]:
    """(rank, target set name) of churn adapter `index`: every rank meets every target set."""
    return RANKS[index % len(RANKS)], list(TARGET_SETS)[(index // len(RANKS)) % len(TARGET_SETS)]


def write_churn_adapters(cfg: ChurnConfig, root: Path) -> dict[str, Path]:
    """The churn adapters as directories of `root`; refuses to overwrite one (it may be loaded)."""
    config = json.loads((cfg.model_dir / "config.json").read_text())
    made = {}
    for index, name in enumerate(cfg.names):
        path = root / name
        if path.exists():
            raise FileExistsError(f"{path} exists: churn adapters must be new to the server")
        rank, targets = churn_shape(index)
        made[name] = write_adapter(path, config, rank=rank, targets=TARGET_SETS[targets], seed=cfg.seed * 100_003 + index,
                                   base_name=cfg.model_dir.name)
    return made


def round_adapters(rng: np.random.Generator, count: int, requests: int, min_distinct: int,
                   popularity: str = "uniform", order: np.ndarray | None = None) -> list[int]:
    """Adapter indices (of `count`) for a round's `requests`, at least `min_distinct` different.

    uniform: a fresh permutation, so every request of the round has its own adapter while there
    are enough. zipf: draws with weight 1/k over `order` (the popularity ranking), then repeated
    picks replaced by unused adapters until `min_distinct` differ."""
    if not 0 < min_distinct <= min(count, requests):
        raise ValueError(f"cannot touch {min_distinct} adapters with {requests} requests over {count} adapters")
    if popularity == "uniform":
        perm = rng.permutation(count)
        return [int(perm[i % count]) for i in range(requests)]
    ranking = np.arange(count) if order is None else order
    weights = 1.0 / np.arange(1, count + 1) ** ZIPF_EXPONENT
    picks = [int(ranking[k]) for k in rng.choice(count, size=requests, p=weights / weights.sum())]
    drawn = set(picks)
    unused = [int(i) for i in rng.permutation(count) if int(i) not in drawn]
    seen: set[int] = set()
    distinct = len(set(picks))
    for pos, pick in enumerate(picks):
        if pick in seen and distinct < min_distinct:
            picks[pos] = unused.pop()
            distinct += 1
        seen.add(picks[pos])
    return picks


def evictions_by_tier(metrics_text: str) -> dict[str, float] | None:
    """quiver_adapter_evictions_total by its `tier` label; None when /metrics does not export it."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "quiver_adapter_evictions_total" and "tier" in sample.labels:
                tier = sample.labels["tier"]
                found[tier] = found.get(tier, 0.0) + float(sample.value)
    return found or None


@dataclass(frozen=True)
class ChurnAnswer:
    round: int
    key: tuple[str, int, str]  # (adapter, prompt, endpoint), as the soak's references
    what: str
    text: str
    steps: list[Step]


@dataclass
class AdapterChurn:
    """The churn traffic of one soak run and what it found."""

    cfg: ChurnConfig
    soak: Soak
    answers: list[ChurnAnswer] = field(default_factory=list)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # by endpoint and streaming
    distinct_per_round: list[int] = field(default_factory=list)
    evictions_before: dict[str, float] | None = None
    eviction_source: str = ""
    written: bool = False

    def __post_init__(self) -> None:
        self.names = self.cfg.names
        self.order = np.random.default_rng(self.cfg.seed + 1).permutation(self.cfg.adapters)

    async def prepare(self, root: Path) -> None:
        """Write the adapters into the server's root, then read the eviction counters to start from."""
        await asyncio.to_thread(write_churn_adapters, self.cfg, root)
        self.written = True
        self.evictions_before = await self.evictions()

    def round_requests(self, rng: np.random.Generator, valid_per_round: int,
                       prompts: int) -> list[tuple[str, int, str, bool]]:
        """(adapter, prompt index below `prompts`, endpoint, stream) of this round's churn requests."""
        count = self.cfg.requests_per_round(valid_per_round)
        picks = round_adapters(rng, self.cfg.adapters, count, self.cfg.host_slots + 1, self.cfg.popularity,
                               self.order)
        self.distinct_per_round.append(len(set(picks)))
        return [(self.names[i], int(rng.integers(prompts)), ("chat", "completions")[int(rng.integers(2))],
                 bool(rng.integers(2))) for i in picks]

    async def request(self, name: str, prompt: int, endpoint: str, stream: bool) -> None:
        ledger = self.soak.ledger
        what = f"adapter_churn {name} {endpoint} stream={stream} prompt={prompt}"
        self.sent[f"{endpoint}{' stream' if stream else ''}"] += 1
        try:
            reply = await self.soak.generate_full(name, prompt, endpoint, stream)
        except openai.APIStatusError as exc:
            ledger.count("adapter_churn", exc.status_code)
            if exc.status_code >= 500 and "retry-after" not in exc.response.headers:
                ledger.violate("no_5xx", f"{what}: {exc.status_code} {exc.message}")
            ledger.violate("adapter_churn", f"{what}: {exc.status_code} {exc.message}")
            return
        except Exception as exc:  # noqa: BLE001 - an error event in a stream, a timeout: every failure counts
            ledger.count("adapter_churn", type(exc).__name__)
            ledger.violate("adapter_churn", f"{what}: {type(exc).__name__}: {exc}")
            return
        ledger.count("adapter_churn", 200)
        self.finish_reasons[str(reply.finish_reason)] += 1
        if reply.finish_reason not in NORMAL_FINISH:
            ledger.violate("adapter_churn", f"{what}: finish_reason {reply.finish_reason!r}")
            return
        self.answers.append(ChurnAnswer(ledger.round, (name, prompt, endpoint), what, reply.text, reply.steps))

    async def evictions(self) -> dict[str, float] | None:
        """Evictions by tier: /metrics, else the probe's engine or /v1/adapters totals."""
        response = await self.soak.http.get("/metrics")
        if response.status_code == 200:
            tiers = evictions_by_tier(response.text)
            if tiers is not None and {"gpu", "host"} <= set(tiers):
                self.eviction_source = "/metrics quiver_adapter_evictions_total{tier}"
                return tiers
        state = await asyncio.to_thread(self.soak.probe.read)
        gpu, host = state["adapter_gpu_evictions"], state["adapter_host_evictions"]
        if gpu is None or host is None:
            return None
        self.eviction_source = (f"{self.soak.probe.sources.get('adapter_gpu_evictions')}, "
                                f"{self.soak.probe.sources.get('adapter_host_evictions')}")
        return {"gpu": float(gpu), "host": float(host)}

    async def finish(self) -> dict[str, Any]:
        """After the rounds: evictions, adapter states, then references one at a time and the comparison."""
        ledger = self.soak.ledger
        after = await self.evictions()
        evicted = None
        if after is None or self.evictions_before is None:
            ledger.skipped["adapter_churn"] = "no eviction counts: " + self.soak.probe.missing()
        else:
            evicted = {tier: after[tier] - self.evictions_before.get(tier, 0.0) for tier in ("gpu", "host")}
            for tier, count in evicted.items():
                if count <= 0:
                    ledger.violate("adapter_churn", f"no {tier} evictions during the churn traffic")
        states = await self.states()
        await self.compare_with_references()
        return {
            "adapters": self.cfg.adapters, "gpu_slots": self.cfg.gpu_slots, "host_slots": self.cfg.host_slots,
            "share": self.cfg.share, "popularity": self.cfg.popularity,
            "shapes": dict(Counter(f"r{r} {t}" for r, t in map(churn_shape, range(self.cfg.adapters)))),
            "sent": dict(self.sent), "requests": dict(ledger.counts.get("adapter_churn", {})),
            "finish_reasons": dict(self.finish_reasons),
            "adapters_used": len({a.key[0] for a in self.answers}),
            "distinct_per_round_min": min(self.distinct_per_round, default=0),
            "distinct_per_round_max": max(self.distinct_per_round, default=0),
            "evictions": evicted, "eviction_source": self.eviction_source, "states": states,
            "references": len({a.key for a in self.answers}),
        }

    async def states(self) -> dict[str, int]:
        """Churn adapters by state (GET /v1/adapters); one in state failed is a violation."""
        response = await self.soak.http.get("/v1/adapters")
        if response.status_code != 200:
            self.soak.ledger.violate("adapter_churn", f"GET /v1/adapters answered {response.status_code}")
            return {}
        ours = [a for a in response.json()["data"] if a.get("id") in set(self.names)]
        for adapter in ours:
            if adapter.get("state") == "failed":
                self.soak.ledger.violate("adapter_churn", f"{adapter['id']} ended failed: {adapter.get('error')}")
        return dict(Counter(str(a.get("state")) for a in ours))

    async def compare_with_references(self) -> None:
        """References alone at temperature 0, adapter by adapter, then every answer against its own."""
        soak = self.soak
        for key in sorted({a.key for a in self.answers}):
            try:
                soak.refs[key], soak.ref_steps[key] = await soak.generate(key[0], key[1], key[2], False)
            except Exception as exc:  # noqa: BLE001
                soak.ledger.violate("adapter_churn", f"reference for {key}: {type(exc).__name__}: {exc}")
        for answer in self.answers:
            if answer.key in soak.refs:
                soak.ledger.round = answer.round
                soak.check_output("adapter_churn", answer.what, answer.text, answer.steps, answer.key)


def churn_summary(churn: dict[str, Any]) -> list[str]:
    """Markdown lines for the report."""
    evicted = {tier: f"{n:.0f}" for tier, n in (churn["evictions"] or {}).items()}
    return [
        "", "## Adapter churn", "",
        f"{churn['adapters']} adapters loaded on demand (GPU slots {churn['gpu_slots']}, host slots "
        f"{churn['host_slots']}), {churn['popularity']} popularity, {churn['share']:.0%} of the valid requests; "
        f"{churn['adapters_used']} adapters answered, {churn['distinct_per_round_min']}–"
        f"{churn['distinct_per_round_max']} per round.", "",
        "| churn | value |", "|---|---|",
        "| sent | " + ", ".join(f"{s}: {n}" for s, n in sorted(churn["sent"].items())) + " |",
        "| answers | " + ", ".join(f"{s}: {n}" for s, n in sorted(churn["requests"].items())) + " |",
        "| finish reasons | " + ", ".join(f"{s}: {n}" for s, n in sorted(churn["finish_reasons"].items())) + " |",
        f"| evictions | gpu {evicted.get('gpu', '–')}, host {evicted.get('host', '–')} "
        f"({churn['eviction_source'] or 'no source'}) |",
        "| adapter states at the end | " + ", ".join(f"{s}: {n}" for s, n in sorted(churn["states"].items())) + " |",
        f"| references (taken after the load) | {churn['references']} |",
        "| shapes (rank, targets) | " + ", ".join(f"{s}: {n}" for s, n in sorted(churn["shapes"].items())) + " |",
    ]
