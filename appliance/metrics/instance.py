"""Metrics of a model instance, recorded by the worker loop and the launcher.

Labelled by the instance's name (from the instances file: a bounded, operator-chosen
set). One process serves one instance, so `livesum` gauges are that process's value,
and they go when it dies. Tokens are llama.cpp's own counts from each finished task's
usage and timings; llama.cpp's own /metrics is re-exported beside these by the API
(appliance_llamacpp_*).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from .. import protocol as P

UP = Gauge("appliance_instance_up", "1 while the instance's model server answers its health check, "
           "0 while it starts or fails it", ["instance"], multiprocess_mode="livesum")
SLOTS_TOTAL = Gauge("appliance_instance_slots", "Slots (tasks run at once) of the instance",
                    ["instance"], multiprocess_mode="livesum")
SLOTS_BUSY = Gauge("appliance_instance_slots_busy", "Slots running a task now", ["instance"],
                   multiprocess_mode="livesum")
STARTS = Counter("appliance_instance_starts_total", "Starts of the instance's launcher since `appliance up`",
                 ["instance"])
TASKS = Counter("appliance_instance_tasks_total", "Tasks the instance finished, by outcome (ok, error)",
                ["instance", "outcome"])
GENERATED = Counter("appliance_instance_generated_tokens_total", "Tokens generated (llama.cpp's predicted_n, "
                    "else usage.completion_tokens)", ["instance"])
PROMPT = Counter("appliance_instance_prompt_tokens_total", "Prompt tokens of finished tasks, evaluated or "
                 "taken from the cache", ["instance"])
PROMPT_CACHED = Counter("appliance_instance_prompt_tokens_cached_total", "Of the prompt tokens, those taken "
                        "from llama.cpp's prompt cache (timings.cache_n)", ["instance"])
SPEED = Gauge("appliance_instance_generation_tokens_per_second", "Generation speed of the instance's last "
              "finished generation (llama.cpp's predicted_per_second)", ["instance"], multiprocess_mode="livesum")


def started(name: str) -> None:
    """A launcher started: counted, and shown down until its server is healthy."""
    STARTS.labels(name).inc()
    UP.labels(name).set(0)


def serving(name: str, slots: int) -> None:
    """The worker loop begins to serve: its engine is up."""
    UP.labels(name).set(1)
    SLOTS_TOTAL.labels(name).set(slots)
    SLOTS_BUSY.labels(name).set(0)


def up(name: str, healthy: bool) -> None:
    UP.labels(name).set(1 if healthy else 0)


def busy(name: str, n: int) -> None:
    SLOTS_BUSY.labels(name).set(n)


def done(name: str, msg: P.Done) -> None:
    """A task's Done, as the worker loop forwards it to the broker."""
    TASKS.labels(name, "ok" if msg.error is None else "error").inc()
    r = msg.result
    if r is None:
        return
    t = r.timings
    generated = t.predicted_n if t is not None and t.predicted_n else r.completion_tokens
    prompt = t.prompt_n + t.cache_n if t is not None and (t.prompt_n or t.cache_n) else r.prompt_tokens
    if generated:
        GENERATED.labels(name).inc(generated)
    if prompt:
        PROMPT.labels(name).inc(prompt)
    if r.cached_tokens:
        PROMPT_CACHED.labels(name).inc(r.cached_tokens)
    if t is not None and t.predicted_per_second > 0:
        SPEED.labels(name).set(t.predicted_per_second)
