"""Which instance runs a task: a pure function of the instances, their GPUs and the task.

The rule (README, "Routing"), in order:
1. Eligible: serves the task's model, has a free slot, is not on a throttled GPU, and
   for work below `high`, has a free slot outside its reserved ones (reserved slots
   are kept for critical and high work, so that it never waits behind a long
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

The GPU's throttle state has hysteresis (`throttled`): an instance whose GPU reached
GPU_THROTTLE_C gets no new work until it cools below GPU_RESUME_C, so it does not
flap in and out at the threshold.
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


@dataclass(frozen=True, slots=True)
class Gpu:
    throttled: bool = False
    memory_free_fraction: float = 1.0


def eligible(c: Candidate, urgent: bool, gpus: dict[int, Gpu]) -> bool:
    if c.free <= 0:
        return False
    if c.gpu >= 0 and gpus.get(c.gpu, Gpu()).throttled:
        return False
    return urgent or c.low_running < c.slots - c.reserved


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
    """Hysteresis: hot at throttle_c and above, cool again only below resume_c."""
    if temperature_c >= throttle_c:
        return True
    if temperature_c < resume_c:
        return False
    return was


def conversation_key(spec: P.TaskSpec, tenant: str) -> str | None:
    """What identifies a conversation for prefix affinity: its session id, else its
    leading messages (up to and including the first user message, which every later
    turn resends unchanged), else a completion's first 512 characters."""
    if isinstance(spec, P.EmbedTask):
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
