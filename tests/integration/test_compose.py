"""The shipping files: docker-compose.yml, Dockerfile, compose config and Grafana dashboard.

These are static checks (no containers are started): the compose file is valid, every
file it mounts exists, the proxy config it mounts loads, and the dashboard queries only
metrics the SPEC promises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DASHBOARD = REPO_ROOT / "config" / "grafana" / "dashboards" / "sluicegate.json"
SPEC = REPO_ROOT / "docs" / "SPEC.md"  # the repository's copy of the contract

_METRIC_LINE = re.compile(r"^(sluicegate_[a-z_]+)(?:\{[^}]*\})?\s+(counter|gauge|histogram)\b")


def spec_metrics() -> dict[str, str]:
    """Metric name -> type, from the code block of SPEC's Metrics section."""
    section = SPEC.read_text().split("## Metrics", 1)
    assert len(section) == 2, f"{SPEC} has no '## Metrics' section"
    metrics = {}
    for line in section[1].splitlines():
        if line.startswith("## "):
            break
        match = _METRIC_LINE.match(line.strip())
        if match:
            metrics[match.group(1)] = match.group(2)
    assert metrics, f"{SPEC}: no metric found in its '## Metrics' section"
    return metrics


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_config_is_valid():
    command = _compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (scripts/ensure-tools.sh installs it)")
        pytest.skip("docker-compose not installed (install the docker-compose package to run)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _bind_mounts() -> list[tuple[str, str, str]]:
    mounts = []
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                if volume.get("type", "bind") == "bind":
                    mounts.append((name, volume["source"], volume["target"]))
                continue
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                mounts.append((name, source, target))
    return mounts


def test_every_bind_mounted_path_exists():
    mounts = _bind_mounts()
    assert mounts, "expected bind mounts for the proxy, prometheus, grafana and locust"
    missing = [
        f"{service}: {source}" for service, source, _ in mounts if not (REPO_ROOT / source).exists()
    ]
    assert not missing, f"mounted paths missing from the repo: {missing}"


def test_stack_has_every_service():
    services = compose()["services"]
    assert set(services) >= {
        "lb",
        "proxy",
        "backend1",
        "backend2",
        "backend3",
        "redis",
        "prometheus",
        "grafana",
        "locust",
    }
    for n in (1, 2, 3):
        command = services[f"backend{n}"]["command"]
        assert command[:1] == ["backend"]
        assert "0.0.0.0" in command
        assert f"backend{n}" in command
    published = {p for s in services.values() for p in s.get("ports", [])}
    for port in ("8080:8080", "9901:9901", "9090:9090", "3000:3000", "8089:8089"):
        assert port in published
    assert {"8080:8080", "9901:9901"} <= set(services["lb"]["ports"])


def test_proxy_scales_behind_the_l4_balancer():
    """`docker-compose up --scale proxy=3`: replicas publish no host port (they would
    clash), HAProxy finds each through Docker's DNS and health-checks its /readyz, and
    Prometheus scrapes every replica."""
    services = compose()["services"]
    proxy = services["proxy"]
    assert "ports" not in proxy and "container_name" not in proxy
    assert {"8080", "9901"} <= {str(port) for port in proxy["expose"]}
    haproxy_cfg = (REPO_ROOT / "config/haproxy.cfg").read_text()
    assert re.search(r"^\s*mode tcp", haproxy_cfg, flags=re.MULTILINE)
    assert re.search(r"server-template \S+ \d+ proxy:8080", haproxy_cfg)
    assert "option httpchk GET /readyz" in haproxy_cfg
    assert "resolvers docker" in haproxy_cfg
    if shutil.which("haproxy") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is required in CI (scripts/ensure-tools.sh installs it)")
        pytest.skip("haproxy not installed")
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(REPO_ROOT / "config/haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    scrape = yaml.safe_load((REPO_ROOT / "config/prometheus.yml").read_text())["scrape_configs"]
    (dns,) = scrape[0]["dns_sd_configs"]
    assert dns["names"] == ["proxy"] and dns["port"] == 9901


def test_compose_proxy_config_loads_and_points_at_the_stack():
    from proxy.config import load_config

    mounts = {target: source for service, source, target in _bind_mounts() if service == "proxy"}
    config = load_config(str(REPO_ROOT / mounts["/etc/sluicegate/sluicegate.yaml"]))
    assert config.admin.host == "0.0.0.0"
    assert config.admin.port == 9901
    assert config.redis is not None
    assert config.redis.url.startswith("redis://redis:6379")
    hosts = sorted(s.host for up in config.upstreams.values() for s in up.servers)
    assert hosts == ["backend1", "backend2", "backend3"]
    assert any(route.rate_limit is not None for route in config.routes)
    # Replicas drain before HAProxy's next /readyz check moves traffic away.
    assert config.drain_time >= 2


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    return exprs


def test_dashboard_queries_only_spec_metrics():
    metrics = spec_metrics()
    histograms = {name for name, kind in metrics.items() if kind == "histogram"}
    exprs = _dashboard_exprs()
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"sluicegate_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            used.add(base if base in histograms else name)
    unknown = sorted(used - set(metrics))
    assert not unknown, f"dashboard queries metrics SPEC does not define: {unknown}"
    # The panels the stack is for.
    for wanted in (
        "sluicegate_requests_total",
        "sluicegate_request_duration_seconds",
        "sluicegate_upstream_healthy",
        "sluicegate_circuit_breaker_state",
        "sluicegate_rate_limited_total",
        "sluicegate_retries_total",
    ):
        assert wanted in used


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    services = compose()["services"]
    targets = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load(
        (REPO_ROOT / "config/grafana/provisioning/dashboards/sluicegate.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] in targets
    datasource = yaml.safe_load(
        (REPO_ROOT / "config/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid


def test_dockerfile_is_multistage_slim_and_non_root():
    text = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(stages) >= 2
    assert stages[-1] == "python:3.11-slim"
    final = text.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in final and "gcc" not in final
    assert re.search(r"^USER\s+sluicegate", final, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["sluicegate"]' in final
    assert 'CMD ["run", "-c", "/etc/sluicegate/sluicegate.yaml"]' in final
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert re.search(r"^EXPOSE\s+8080\s+9901", final, flags=re.MULTILINE)
    copied = re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.MULTILINE)
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerfile_compiles_in_the_builder_and_ships_compiled():
    text = (REPO_ROOT / "Dockerfile").read_text()
    builder, final = text.rsplit("\nFROM ", 1)
    # setup.py is what compiles; without it the wheel would be pure Python.
    assert re.search(r"^COPY\s+.*\bsetup\.py\b", builder, flags=re.MULTILINE)
    assert "build-essential" in builder
    assert "proxy.COMPILED" in final  # the image build fails if nothing was compiled
