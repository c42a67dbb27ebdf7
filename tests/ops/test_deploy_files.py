"""The deployment files agree with the server they deploy (Docker cannot run here; read them instead)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from server import cli

REPO = Path(__file__).resolve().parents[2]
SERVE_ENV = {cli.env_name(flag) for flag, *_ in cli._SERVE_OPTIONS} | {
    cli.env_name("--protect-metrics"), cli.env_name("--refuse-base-mismatch"), "QUIVER_ADAPTERS", "QUIVER_CACHE"}


def test_the_dockerfile_installs_cuda_torch_and_the_project_and_runs_unprivileged() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text)
    assert 'pip install "torch==${TORCH_VERSION}"' in text and "torch.version.cuda" in text
    assert 'pip install ".[training]"' in text
    assert re.search(r"^USER 10001$", text, re.M) and "HEALTHCHECK" in text and "/ready" in text
    assert re.search(r'^VOLUME \["/models", "/adapters"\]$', text, re.M)
    assert text.rstrip().endswith('CMD ["quiver", "serve", "--host", "0.0.0.0"]')
    for name in re.findall(r"\b(QUIVER_[A-Z_]+)=", text):
        assert name in SERVE_ENV, name


def test_the_kubernetes_manifest_sets_only_real_options() -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "quiver.yaml").read_text()))
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    names = [e["name"] for e in container["env"] if e["name"].startswith("QUIVER_")]
    assert names and set(names) <= SERVE_ENV, set(names) - SERVE_ENV
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["QUIVER_SHUTDOWN_TIMEOUT"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_dashboard_is_grafana_json_over_quiver_metrics() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "quiver-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "Quiver"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert all(re.search(r"\bquiver_\w+", e) for e in exprs)
    for needed in ("quiver_requests_total", "quiver_time_to_first_token_seconds_bucket", "quiver_adapters"):
        assert any(needed in e for e in exprs), needed


def test_every_python_package_is_listed_for_the_wheel() -> None:
    """The image installs a wheel (`pip install .`), which holds only the packages pyproject lists:
    a package missing there imports in a checkout and fails in the image."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("server", "engine", "scheduler", "adapters", "training")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
