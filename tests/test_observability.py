"""Metrics, alert rules and dashboards against the live local Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import yaml

from eventing.ingest.publish import Publisher
from eventing.telemetry import dashboards
from functions.generate import EVENT_TYPE
from tests.helpers import ROOT

RULES = sorted((ROOT / "infra" / "prometheus").glob("*.rules.yml"))


def _event(pid: str, amount: float) -> dict:
    p = {"payment_id": pid, "card_id": "card-00007", "merchant_id": "m-0003",
         "amount": amount, "currency": "EUR", "country": "DE",
         "event_time": int(time.time() * 1000)}
    return {"specversion": "1.0", "id": pid, "source": "/tests/obs", "type": EVENT_TYPE,
            "partitionkey": p["card_id"], "datacontenttype": "application/json", "data": p}


@pytest.fixture(scope="module")
def traffic(pipeline):
    """Good payments and a few impossible ones (dead letters), published once."""
    tag = uuid.uuid4().hex[:6]
    # Alerts fire on increases: let Prometheus see validate's counter before the failures.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _query(
            pipeline.prometheus_url, 'sluice_function_dead_lettered_total{function="validate"}'):
        time.sleep(1)
    time.sleep(6)  # one more scrape interval, so the series has a sample before the rise
    with Publisher(pipeline.gateway_url) as pub:
        pub.send_many([_event(f"obs{tag}-{i}", 20.0 + i) for i in range(300)], batch_size=50)
        for i in range(3):
            pub.send(_event(f"obsbad{tag}-{i}", -1.0))
    return pipeline


def _query(url: str, promql: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    assert RULES, "no rule files in infra/prometheus"
    proc = subprocess.run([promtool, "check", "rules", *map(str, RULES)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = sum(len(group["rules"]) for path in RULES
                for group in yaml.safe_load(path.read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in proc.stdout


def test_committed_dashboards_are_the_generated_ones() -> None:
    for name, text in dashboards.render().items():
        committed = (ROOT / "infra" / "grafana" / name).read_text()
        assert committed == text, f"infra/grafana/{name} is stale: run `sluice dashboards`"
        json.loads(committed)


@pytest.mark.stack
def test_every_dashboard_panel_returns_data(traffic) -> None:
    url = traffic.prometheus_url
    pending = []
    for make in (dashboards.overview, dashboards.function_detail):
        pending += dashboards.queries(make(), {"function": "validate"})
    assert len(pending) == len(dashboards.OVERVIEW) + len(dashboards.FUNCTION)
    deadline = time.monotonic() + 90
    empty = pending
    while empty and time.monotonic() < deadline:
        empty = [(title, q) for title, q in empty if not _query(url, q)]
        if empty:
            time.sleep(2)
    assert not empty, f"panels without data: {empty}"


@pytest.mark.stack
def test_dead_letter_alert_fires(traffic) -> None:
    url = traffic.prometheus_url
    deadline = time.monotonic() + 90
    firing = []
    while time.monotonic() < deadline:
        alerts = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        firing = [a for a in alerts if a["labels"]["alertname"] == "SluiceDeadLetters"
                  and a["state"] == "firing"]
        if firing:
            break
        time.sleep(2)
    assert firing, "SluiceDeadLetters never fired"
    assert firing[0]["labels"]["function"] == "validate"


@pytest.mark.stack
def test_sluice_top_shows_each_function(traffic) -> None:
    offset = traffic.ports.broker - 9092
    proc = subprocess.run(
        [sys.executable, "-m", "eventing.cli", "--state-dir", str(traffic.state_dir),
         "--port-offset", str(offset), "top", "--once"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["FUNCTION", "EV/S"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert {"validate", "enrich", "score"} <= set(rows)
    assert float(rows["validate"][-1]) >= 300  # total processed
