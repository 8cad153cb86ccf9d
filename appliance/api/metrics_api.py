"""GET /metrics: the whole appliance's figures in one scrape, on the API's port.

Every process writes its metrics to the shared directory (appliance/metrics); each
scrape builds a fresh registry that merges them (prometheus-client's multiprocess
mode needs a fresh one: the files, not this worker's memory, hold the figures) and
adds each llama.cpp server's own /metrics, fetched with the key its launcher left in
RUN_DIR/NAME.key, renamed `appliance_llamacpp_*` and labelled with its `instance`.
An instance that does not answer within LLAMACPP_TIMEOUT_S is skipped and counted
(`appliance_llamacpp_up` 0, appliance_api_llamacpp_scrape_failures_total). Access is
OPS, like /readyz: loopback callers or any valid token (OPS_ENDPOINTS).
"""
from __future__ import annotations

import http.client
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from .. import metrics as shared
from .base import Api
from ..broker_client import BrokerRefused, BrokerUnavailable
from .metrics import LLAMACPP_SCRAPE_FAILURES
from .middleware import OPS

LLAMACPP_TIMEOUT_S = 1.0
PREFIX = "appliance_llamacpp_"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # an instance name (instances.py): also a file name here


def renamed(name: str) -> str:
    """llama.cpp's `llamacpp:prompt_tokens` -> `appliance_llamacpp_prompt_tokens`."""
    return PREFIX + name.removeprefix("llamacpp:").replace(":", "_")


class LlamaCppCollector:
    """Each registered instance's llama.cpp /metrics, fetched in parallel at collect time."""

    def __init__(self, api: Api, run_dir: str):
        self.api = api
        self.run_dir = Path(run_dir)

    def _fetch(self, target: tuple[str, str]) -> str | None:
        name, endpoint = target
        url = urlsplit(endpoint)
        if url.scheme != "http" or not url.hostname:
            return None
        try:
            key = (self.run_dir / f"{name}.key").read_text().strip()
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=LLAMACPP_TIMEOUT_S)
            try:
                conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
                r = conn.getresponse()
                body = r.read()
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return None
        return body.decode("utf-8", "replace") if r.status == 200 else None

    def collect(self):
        try:
            workers = self.api.broker().stats().workers
        except (BrokerUnavailable, BrokerRefused):
            return  # no instance list without the broker; appliance_broker_up is absent then
        targets = sorted({(w.name, w.endpoint) for w in workers if _NAME.match(w.name) and w.endpoint})
        if not targets:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            texts = list(pool.map(self._fetch, targets))
        up = GaugeMetricFamily("appliance_llamacpp_up", "1 when the instance's llama.cpp answered /metrics in this "
                               "scrape", labels=["instance"])
        families: dict[str, Metric] = {}
        for (name, _), text in zip(targets, texts):
            parsed = None
            if text is not None:
                try:
                    parsed = list(text_string_to_metric_families(text))
                except ValueError:
                    parsed = None
            up.add_metric([name], 0 if parsed is None else 1)
            if parsed is None:
                LLAMACPP_SCRAPE_FAILURES.labels(name).inc()
                continue
            for fam in parsed:
                new = renamed(fam.name)
                out = families.get(new)
                if out is None:
                    out = families[new] = Metric(new, fam.documentation, fam.type)
                for s in fam.samples:
                    out.add_sample(new + s.name[len(fam.name):], {**s.labels, "instance": name}, s.value)
        yield up
        yield from families.values()


class _ThisProcess:
    """Outside multiprocess mode (a test's in-process app): this process's own metrics."""

    def collect(self):
        return REGISTRY.collect()


class Metrics:
    auth = OPS  # loopback callers, or a token (OPS_ENDPOINTS), like /readyz

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        registry = CollectorRegistry()
        registry.register(LlamaCppCollector(self.api, self.api.s.run_dir))  # first: its failures count below
        path = os.environ.get(shared.ENV)
        if path:
            shared.sweep(path)  # a process that died without a successor leaves no gauges
            multiprocess.MultiProcessCollector(registry, path)
        else:
            registry.register(_ThisProcess())
        resp.content_type = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
        resp.data = generate_latest(registry)
