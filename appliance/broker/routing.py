"""Which instance runs a task: a pure function of the instances, their GPUs and the task.

The rule (README, "Routing"), in order:
1. Eligible: serves the task's model, has a free slot, is not on a throttled GPU, is
   not suspect (its engine failed a task and its launcher has not offered work since),
   and for work below `high`, has a free slot outside its reserved ones (reserved
   slots are kept for critical and high work, so that it never waits behind a long
   generation).
2. A task retried after its instance was lost avoids that instance when another is
   eligible.
3. Prefix affinity, with bounded load: a conversation goes back to the instance that
   served it before, whose llama.cpp holds its prompt in cache, as long as that
   instance runs at most `slack` tasks more than the least busy eligible one (as Ray
   Serve's PrefixCacheAffinityRouter and SGLang's cache-aware router do).
4. Otherwise the lowest expected time to finish: (running + 1) / slots, times the
   instance's measured seconds per token (an EWMA; instances not yet measured count as
   the mean of those that are), doubled on a GPU with less than 5 % memory free. Ties:
   fewer running tasks, then the name.

The GPU's throttle state (`gpu_state`) has hysteresis: an instance whose GPU reached
THERMAL_LIMIT_C, or that NVML says slows down for heat or a hardware cause, or whose
memory is MEMORY_PRESSURE_PCT full, gets no new work until the GPU is at or below
THERMAL_RESUME_C, the reason has cleared and its memory is MEMORY_RESUME_MARGIN_PCT
below the mark, so it does not flap in and out at a threshold.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .. import protocol as P

LOW_MEMORY_FRACTION = 0.05
URGENT = P.LEVEL["high"]  # this level and above: may take reserved slots, may preempt


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the rule reads of an instance. The broker passes its pool's Worker objects,
    which have these same fields (no allocation per task); tests pass Candidates."""

    name: str
    free: int                      # free slots (the worker's credit)
    slots: int
    running: int
    low_running: int               # of those, tasks below `high`
    reserved: int                  # slots only critical/high may take
    seconds_per_token: float = 0.0  # EWMA; 0: not measured yet
    gpu: int = -1
    suspect: bool = False          # its engine just failed a task; it has not offered work since


MEMORY_RESUME_MARGIN_PCT = 5.0


@dataclass(frozen=True, slots=True)
class Gpu:
    throttled: bool = False
    memory_free_fraction: float = 1.0
    reason: str = ""  # why it is throttled (or still held back: the hysteresis)


@dataclass(frozen=True, slots=True)
class Limits:
    thermal_c: float = 85.0
    resume_c: float = 80.0
    memory_pct: float = 95.0


def takes_work(c: Candidate, gpus: dict[int, Gpu]) -> bool:
    """A free slot, not suspect, not on a throttled GPU: what dispatch and claims both ask first."""
    return c.free > 0 and not c.suspect and not (c.gpu >= 0 and gpus.get(c.gpu, Gpu()).throttled)


def eligible(c: Candidate, urgent: bool, gpus: dict[int, Gpu]) -> bool:
    return takes_work(c, gpus) and (urgent or c.low_running < c.slots - c.reserved)


def choose(candidates: list[Candidate], urgent: bool, gpus: dict[int, Gpu], affinity: str | None = None,
           avoid: frozenset[str] | set[str] = frozenset(), slack: int = 1) -> Candidate | None:
    """The instance to run a task on, or None when none may take it now.

    `urgent`: the task is critical or high; `affinity`: the instance that served this
    conversation before; `avoid`: instances that lost this task."""
    pool = [c for c in candidates if eligible(c, urgent, gpus)]
    if avoid and any(c.name not in avoid for c in pool):
        pool = [c for c in pool if c.name not in avoid]
    if not pool:
        return None
    least = min(c.running for c in pool)
    if affinity is not None:
        for c in pool:
            if c.name == affinity and c.running - least <= slack:
                return c
    measured = [c.seconds_per_token for c in pool if c.seconds_per_token > 0]
    typical = sum(measured) / len(measured) if measured else 1.0

    def cost(c: Candidate) -> tuple[float, int, str]:
        speed = c.seconds_per_token if c.seconds_per_token > 0 else typical
        gpu = gpus.get(c.gpu, Gpu()) if c.gpu >= 0 else Gpu()
        penalty = 2.0 if gpu.memory_free_fraction < LOW_MEMORY_FRACTION else 1.0
        return (c.running + 1) / c.slots * speed * penalty, c.running, c.name

    return min(pool, key=cost)


def throttled(was: bool, temperature_c: float, throttle_c: float, resume_c: float) -> bool:
    """Temperature alone, with hysteresis: hot at throttle_c and above, back at resume_c and below."""
    if temperature_c >= throttle_c:
        return True
    if temperature_c <= resume_c:
        return False
    return was


def gpu_state(was: Gpu, r: P.GpuReading, limits: Limits) -> Gpu:
    """A GPU's new throttle state from its reading and its previous state.

    Out: temperature at THERMAL_LIMIT_C, NVML's thermal or hardware slowdown (the GPU
    slows itself, whatever its temperature says), or memory at MEMORY_PRESSURE_PCT.
    Back in only when all are clear with margin: at or below THERMAL_RESUME_C, no
    such reason, memory MEMORY_RESUME_MARGIN_PCT below the mark. A power cap is not a
    reason: the GPU still serves, only slower (routing's speed EWMA sees that)."""
    total = r.memory_total_mb
    used_pct = 100.0 * r.memory_used_mb / total if total > 0 else 0.0
    free = (r.memory_free_mb if r.memory_free_mb is not None else total - r.memory_used_mb) / total \
        if total > 0 else 1.0
    causes = []
    if r.temperature_c >= limits.thermal_c:
        causes.append(f"{r.temperature_c:.0f} °C, limit {limits.thermal_c:g}")
    if r.throttle_thermal:
        causes.append("NVML: thermal slowdown")
    if r.throttle_hardware:
        causes.append("NVML: hardware slowdown")
    if used_pct >= limits.memory_pct:
        causes.append(f"memory {used_pct:.0f} % used, limit {limits.memory_pct:g}")
    if causes:
        return Gpu(True, free, "; ".join(causes))
    if was.throttled:
        holding = []
        if r.temperature_c > limits.resume_c:
            holding.append(f"{r.temperature_c:.0f} °C, back at {limits.resume_c:g}")
        if used_pct > limits.memory_pct - MEMORY_RESUME_MARGIN_PCT:
            holding.append(f"memory {used_pct:.0f} % used, back at {limits.memory_pct - MEMORY_RESUME_MARGIN_PCT:g}")
        if holding:
            return Gpu(True, free, "cooling down: " + "; ".join(holding))
    return Gpu(False, free, "")


def conversation_key(spec: P.TaskSpec, tenant: str) -> str | None:
    """What identifies a conversation for prefix affinity: its session id, else its
    leading messages (up to and including the first user message, which every later
    turn resends unchanged), else a completion's first 512 characters."""
    if not isinstance(spec, (P.ChatTask, P.CompleteTask, P.ExtractTask)):
        return None
    if spec.session_id is not None:
        return f"s\0{tenant}\0{spec.session_id}"
    h = hashlib.blake2b(digest_size=12)
    if isinstance(spec, P.CompleteTask):
        h.update(spec.prompt[:512].encode())
    else:
        for m in spec.messages:
            h.update(f"{m.role}\0{len(m.content)}\0".encode() + m.content.encode())
            if m.role == "user":
                break
    return f"p\0{tenant}\0{h.hexdigest()}"


def claim_room(candidates: list[Candidate], gpus: dict[int, Gpu], queued: int) -> tuple[int, int]:
    """How many tasks of one model a box should claim from the shared queue: (any
    priority, critical/high only), given its instances of that model and the `queued`
    tasks of it it holds already. A box claims no more than it can start now (a task
    it holds waits for this box alone); reserved slots take only urgent work, as in
    `eligible`."""
    low = urgent = 0
    for c in candidates:
        if not takes_work(c, gpus):
            continue
        open_low = max(0, min(c.free, c.slots - c.reserved - c.low_running))
        low += open_low
        urgent += c.free - open_low
    any_room = max(0, low - queued)
    return any_room, max(0, low + urgent - queued) - any_room
