"""Monitoring as shipped: docs/prometheus.yml, docs/alert_rules.yml (with its unit tests,
docs/alert_rules_test.yml) and docs/grafana-dashboard.json.

Prometheus's own promtool judges them, because only its parser knows whether a config,
an expression or an annotation template is valid, and `promtool test rules` shows every
rule firing on the data it is meant for and silent on healthy data. promtool is Debian's
`prometheus` package unpacked without installing it (tests/support/edge.py), as nginx
is for the edge tests; the second run finds it in build/edge-tools/.

The last test scrapes a live appliance: every metric name an alert or a panel reads must
be one it exports (docs/METRICS.md), else the alert never fires and the panel stays
empty. Two kinds of name are external and asserted exactly instead: `up` (Prometheus
makes it per target) and node_exporter's `node_*` (the appliance exports no host metrics).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, running_appliance, wait_until
from support import edge

DOCS = ROOT / "docs"
RULES = DOCS / "alert_rules.yml"
RULE_TESTS = DOCS / "alert_rules_test.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"

PROMETHEUS_OWN = {"up"}
NODE_EXPORTER = {"node_cpu_seconds_total", "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes",
                 "node_filesystem_avail_bytes", "node_filesystem_size_bytes"}
# The system description's alerts, and what issue #14 added: each must exist.
REQUIRED_ALERTS = {
    "ApplianceApiDown", "ApplianceApiHighErrorRate", "ApplianceApiHighLatency", "ApplianceQueueBackingUp",
    "ApplianceQueueWaitHigh", "ApplianceQueueStalled", "ApplianceTaskFailureRateHigh",
    "ApplianceGpuTemperatureHigh", "ApplianceGpuTemperatureCritical", "ApplianceGpuMemoryHigh",
    "ApplianceGpuMemoryCritical", "ApplianceGpuThrottling", "ApplianceJournalErrors", "ApplianceInstanceDown",
    "ApplianceInstanceRestarting", "ApplianceBrokerDrainingTooLong", "ApplianceFramesDropped",
    "ApplianceRepliesUndeliverable", "HostHighCpu", "HostLowMemory", "HostLowDisk",
}
REQUIRED_PANELS = {
    "Queue depth by priority", "API request rate by status", "API latency p50 / p95", "Task outcomes",
    "Dispatch latency", "GPU temperature", "GPU memory", "GPU power", "GPU throttle reasons", "Instances up",
    "Slots busy", "Tokens/s", "Journal commit latency",
}


@pytest.fixture(scope="module")
def promtool() -> edge.Tool:
    """promtool from PATH, else from Debian's `prometheus` package (a Go binary: none of
    the package's Depends, which serve its web UI, is needed)."""
    return edge.on_path("promtool") or edge.debian_tool(
        "prometheus", ["prometheus"], "/usr/bin/promtool", dependencies=False)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its variables'."""
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", q)
            assert m, f"variable {var['name']}: only label_values(metric, label) is parsed here: {q}"
            queries.append(m.group(1))
    return queries


# ------------------------------------------------------------------ PromQL names

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
            "bool", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads. What is left out, in order: strings,
    label matchers {...}, ranges [...], the label lists of by/without/on/ignoring/
    group_*, Grafana variables ($job, $__rate_interval); then a token followed by "("
    is a function or an aggregation, and a keyword is no name. Numbers and durations
    (0.95, 1e9, 5m) never start a token."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    tokens = re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e)
    return {t for t in tokens if t.lower() not in KEYWORDS}


def test_metric_names_are_found_in_promql():
    """The parser the live test relies on, on the shapes the rules and panels use."""
    assert metric_names('histogram_quantile(0.95, sum without (route, method) (rate('
                        'x_seconds_bucket{route!~"/v1/(chat)|y"}[5m]))) > 0.5') == {"x_seconds_bucket"}
    assert metric_names('up{job="appliance"} == 0 or absent(up{job="appliance"})') == {"up"}
    assert metric_names('1 - avg without (cpu, mode) (rate(node_cpu_seconds_total{mode="idle"}[5m])) > 0.9') \
        == {"node_cpu_seconds_total"}
    assert metric_names("a_total / on (job) group_left (gpu) b offset 1h > bool 1e9") == {"a_total", "b"}
    assert metric_names('sum by (le, route) (rate(c_bucket{job=~"$job"}[$__rate_interval]))') == {"c_bucket"}
    assert metric_names("max without (reason) (d{reason=~\"sw_thermal|hw_thermal\"}) == 1 or e > 85") == {"d", "e"}


# ------------------------------------------------------------------ promtool


def test_scrape_config_is_valid(promtool, tmp_path):
    """As installed: prometheus.yml, alert_rules.yml and the token file side by side
    (promtool checks that the token file exists and that the rule files load)."""
    for f in ("prometheus.yml", "alert_rules.yml"):
        shutil.copy(DOCS / f, tmp_path / f)
    (tmp_path / "appliance.token").write_text("a token from `appliance token`\n")
    r = promtool.run("check", "config", str(tmp_path / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout + r.stderr

    conf = yaml.safe_load((DOCS / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["alert_rules.yml"]
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    app = jobs["appliance"]
    assert app["scrape_interval"] == "15s" and app["metrics_path"] == "/metrics"
    assert app["authorization"] == {"type": "Bearer", "credentials_file": "appliance.token"}
    assert app["honor_labels"] is True  # the appliance's `instance` label (llama-0) must survive
    assert "node" in jobs  # the host alerts read node_exporter


def test_rules_are_valid_and_complete(promtool):
    r = promtool.run("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    all_rules = rules()
    names = [x["alert"] for x in all_rules]
    assert len(names) == len(set(names)) >= 19
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    for x in all_rules:
        assert x["labels"]["severity"] in ("critical", "warning"), x["alert"]
        assert "for" in x, f"{x['alert']}: say `for:` even when it is 0m"
        assert {"summary", "description"} <= set(x["annotations"]), x["alert"]
        assert "$labels" in x["annotations"]["summary"] + x["annotations"]["description"], x["alert"]


def test_every_rule_fires_and_stays_silent(promtool):
    """promtool test rules: each rule has a case where it fires (labels and rendered
    annotations compared exactly) and one where it does not."""
    r = promtool.run("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    fires, silent = set(), set()
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {x["alert"] for x in rules()}
    assert names - fires == set(), "never shown firing"
    assert names - silent == set(), "never shown silent"


def test_dashboard_is_well_formed(promtool, tmp_path):
    """Grafana's JSON model (schemaVersion >= 36) with the issue's panels, each query
    valid PromQL: promtool checks them as recording rules (Grafana's variables
    replaced by what Grafana would put there)."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    assert REQUIRED_PANELS <= titles, REQUIRED_PANELS - titles
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        if p["type"] in ("row", "text"):
            assert "targets" not in p, p["title"]
            continue
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    rag = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "RAG")
    assert all("appliance_rag_" in json.dumps(p["targets"]) for p in panels[rag + 1:]) and len(panels) > rag + 2

    exprs = [re.sub(r"\$__rate_interval", "1m", q).replace('=~"$job"', '=~".+"') for q in dashboard_queries()]
    assert not [q for q in exprs if "$" in q], "a Grafana variable left in a query"
    rec = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": q}
                                                      for i, q in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rec))
    r = promtool.run("check", "rules", str(tmp_path / "dashboard.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ against a live appliance

CHAT = {"type": "chat", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]}
GPU = {"name": "NVIDIA H200", "uuid": "GPU-0", "memory_total_mb": 143771.0, "memory_used_mb": 20480.0,
       "memory_reserved_mb": 615.125, "memory_free_mb": 143771.0 - 615.125 - 20480.0, "utilization_pct": 40,
       "memory_utilization_pct": 10, "temperature_c": 51, "temperature_slowdown_c": 89, "temperature_shutdown_c": 92,
       "power_w": 300.5, "power_limit_w": 700.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 3201,
       "throttle_reasons": ["sw_power_cap"], "processes": []}


def documented() -> set[str]:
    """The family names in docs/METRICS.md's tables (counters with their _total)."""
    return {m.group(1) for m in re.finditer(r"^\| `(appliance_\w+)` \|", (DOCS / "METRICS.md").read_text(), re.M)}


def test_every_metric_used_is_exported(tmp_path_factory):
    """Labelled families have series only once their event happened, so it is made to:
    two tasks (the second one's prompt from llama.cpp's cache), an anonymous call
    refused, a garbage frame on the broker's front socket. Then every appliance_* name
    used must be a sample name of the scrape (`_bucket` of a histogram, `_total` of a
    counter, as PromQL reads them) and its family a row of docs/METRICS.md."""
    import zmq

    used = {n for x in rules() for n in metric_names(x["expr"])}
    used |= {n for q in dashboard_queries() for n in metric_names(q)}
    ours = {n for n in used if n.startswith("appliance_")}
    assert {n for n in used if n.startswith("node_")} == NODE_EXPORTER
    assert used - ours - NODE_EXPORTER == PROMETHEUS_OWN

    docs = documented()
    for n in sorted(ours):
        family = n if n in docs else re.sub(r"_(bucket|sum|count)$", "", n)
        assert family in docs, f"{n} is not in docs/METRICS.md"

    samples = tmp_path_factory.mktemp("nvml") / "nvml.jsonl"
    samples.write_text(json.dumps({"t": 0, "gpus": [GPU]}) + "\n")
    with running_appliance(tmp_path_factory, NVML_SAMPLES=str(samples)) as app:
        for _ in range(2):  # the same prompt again: llama.cpp's prompt cache gives cached tokens
            r = app.post("/v1/async/submit", json=CHAT)
            assert r.status_code == 202, r.text
            task = r.json()["task_id"]
            wait_until(lambda: app.get(f"/v1/async/result/{task}").status_code == 200, 60, 0.05, "the task's result")
        assert app.get("/v1/async/stats", headers={"Authorization": None}).status_code == 401
        rag = app.auth(app.mint("metrics", "rag:read", "rag:write", "tasks:read"))
        doc = app.post("/v1/rag/documents", json={"title": "t", "text": "Aspirin 300 mg."}, headers=rag).json()
        wait_until(lambda: app.get(f"/v1/async/result/{doc['task_id']}", headers=rag).status_code == 200, 60, 0.1,
                   "the document indexed")
        assert app.post("/v1/rag/search", json={"query": "aspirin"}, headers=rag).status_code == 200
        assert app.request("DELETE", f"/v1/rag/documents/{doc['document_id']}", headers=rag).status_code == 200
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(app.settings().broker_front)
            sock.send(b"not the protocol")
            sock.close()
        finally:
            ctx.term()

        def missing():
            text = requests.get(app.url + "/metrics", timeout=10).text
            families = list(text_string_to_metric_families(text))
            exposed = {s.name: f.type for f in families for s in f.samples}
            gone = sorted(ours - exposed.keys())
            wrong = sorted(n for n in ours & exposed.keys() if n.endswith("_bucket") and exposed[n] != "histogram")
            return (gone, wrong) if gone or wrong else None
        # gauges lag by up to 1 s (broker) or GPUMON_INTERVAL_S; counters land with the event
        try:
            wait_until(lambda: missing() is None, 10, 0.2, "every name used to be exported")
        except AssertionError:
            gone, wrong = missing() or ([], [])
            pytest.fail(f"used in docs/alert_rules.yml or docs/grafana-dashboard.json but not exported: {gone}; "
                        f"_bucket of a family that is no histogram: {wrong}")
