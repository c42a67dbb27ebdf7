"""Prometheus metrics, served on `GET /metrics` from a registry private to one app.

Two kinds of metrics:
- per request, recorded as requests run (server/openai/metered.py): requests by adapter and
  outcome, time to first token, inter-token latency, end-to-end latency, queue time,
  prompt and generated tokens; and HTTP requests by route and status;
- engine state, read only when scraped (server/engine_view.py), so the hot path pays nothing.

Adapter names become label values through `AdapterLabels`: the first `max_adapter_labels`
names keep their own value, later ones share `other`, so thousands of adapters cannot blow up
the number of series. The base model is labelled with its served name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from server.http.engine_view import EngineCollector, read_view
from server.http.routing import ApiRoute, Operation

# The classic text format: OpenMetrics would rewrite the `vllm:` names that gateways look for.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
DEFAULT_MAX_ADAPTER_LABELS = 64
OUTCOMES = ("stop", "length", "cancelled", "aborted", "error", "rejected", "invalid")

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)


class AdapterLabels:
    """Label values for adapter names: a name's own while fewer than `cap` names have one, else `other`."""

    def __init__(self, cap: int = DEFAULT_MAX_ADAPTER_LABELS) -> None:
        if cap < 1:
            raise ValueError(f"the adapter label cap must be at least 1, got {cap}")
        self.cap = cap
        self._known: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self._known:
            return name
        if len(self._known) >= self.cap:
            return OTHER
        self._known.add(name)
        return name


class RouteNames:
    """The route template of a request (`/v1/adapters/{name}`), so that paths cannot add series."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self._routes = [r for r in routes if isinstance(r, Route)]

    def __call__(self, scope: Scope) -> str:
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return "unmatched"


class Metrics:
    """The metrics of one app; `job_manager` (a training.jobs.JobManager) adds fine-tuning jobs by state."""

    def __init__(self, *, max_adapter_labels: int = DEFAULT_MAX_ADAPTER_LABELS, job_manager: Any | None = None) -> None:
        # A `_created` series per counter and histogram doubles what Prometheus stores and says
        # nothing a restart (`resets()`) does not; prometheus_client only offers a process-wide switch.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.adapter_label = AdapterLabels(max_adapter_labels)
        self.job_manager = job_manager
        self.route_name: RouteNames = RouteNames([])
        r = self.registry
        self.requests = Counter("quiver_requests", "Generation requests (one per choice) by adapter and outcome: "
                                "stop, length, cancelled (client left), aborted, error, rejected (overload), "
                                "invalid.", ["adapter", "outcome"], registry=r)
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens prefilled.", ["adapter"], registry=r)
        self.generation_tokens = Counter("quiver_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.time_to_first_token = Histogram(
            "quiver_time_to_first_token_seconds", "From the request's arrival to its first generated token.",
            ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "quiver_inter_token_latency_seconds", "Between two consecutive generated tokens of a request.",
            ["adapter"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "quiver_e2e_request_latency_seconds", "From arrival to the last token, for requests that finished "
            "(stop or length).", ["adapter"], buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "quiver_request_queue_time_seconds", "Time a request waited in the scheduler's queue before its "
            "first step (reported by the engine on the first token).", ["adapter"], buckets=_TTFT_BUCKETS,
            registry=r)
        self.http_requests = Counter("quiver_http_requests", "HTTP requests by method, route template and status.",
                                     ["method", "route", "status"], registry=r)
        self.http_in_flight = Gauge("quiver_http_requests_in_flight", "HTTP requests being served, by route template.",
                                    ["route"], registry=r)
        self.engine = EngineCollector(self.adapter_label)
        r.register(self.engine)

    def track_http(self, scope: Scope) -> Callable[[int, float], None]:
        """Count a request in flight; the returned callable records its response."""
        method, route = scope.get("method", ""), self.route_name(scope)
        in_flight = self.http_in_flight.labels(route)
        in_flight.inc()

        def done(status: int, seconds: float) -> None:
            in_flight.dec()
            self.http_requests.labels(method, route, str(status)).inc()

        return done

    async def render(self, state: Any) -> bytes:
        """The exposition text, with engine state read now."""
        view = await read_view(state, self.job_manager)
        # No await between handing the view over and rendering: concurrent scrapes cannot mix.
        self.engine.view = view
        return generate_latest(self.registry)


def metrics_route(state: Any, metrics: Metrics) -> ApiRoute:
    async def endpoint(request: Request) -> Response:
        return Response(await metrics.render(state), media_type=CONTENT_TYPE)

    # Prometheus' text format, not JSON: left out of the OpenAPI document.
    return ApiRoute("/metrics", endpoint, Operation("Prometheus metrics", "Probes", quiet=True), methods=["GET"],
                    documented=False)
