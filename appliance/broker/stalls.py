"""Loop iterations that took too long, and where the time went.

Why: the API gives up on the broker after BROKER_TIMEOUT_S and answers 503
broker_unavailable. When that happens on a loaded box the operator needs to know
whether the broker's own work was slow (a journal fsync, a claim in PostgreSQL, a
burst of messages) or whether the process simply did not run (CPU starved, the VM
paused, SIGSTOP): the first is ours to fix, the second is the machine's. So the loop
times its phases and, for an iteration past SLOW_S, names the longest phase; time
spent in the poll beyond what the loop asked for is "not scheduled".

Pure bookkeeping with the clock passed in: the broker calls it, tests drive it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SLOW_S = 0.25        # an iteration (or a late wake-up) this long is a stall
TELL_EVERY_S = 10.0  # stalls are logged at most this often (a sick disk stalls every commit)
LATE = "not scheduled"  # the poll returned this much later than it was asked to
# The loop's phases, in order (server.Broker.run laps them; tests check the two agree).
PHASES = ("messages", "claims", "timers", "dispatch", "journal commit", "leases", "replies", LATE)


@dataclass
class Stall:
    seconds: float
    phase: str                   # the longest phase, or LATE
    phases: dict[str, float]     # every phase that took any time, in loop order
    untold: int                  # stalls since the last one logged (this one included)
    tell: bool                   # log it now (at most every TELL_EVERY_S); count it always

    def describe(self) -> str:
        parts = ", ".join(f"{name} {s:.3f}s" for name, s in self.phases.items() if s >= 0.001)
        more = f"; {self.untold - 1} more since the last report" if self.untold > 1 else ""
        return f"{self.seconds:.2f}s, mostly {self.phase} ({parts}){more}"


@dataclass
class LoopClock:
    slow_s: float = SLOW_S
    tell_every_s: float = TELL_EVERY_S
    total: int = 0                                      # stalls since start
    by_phase: dict[str, int] = field(default_factory=dict)
    _marks: list[tuple[str, float]] = field(default_factory=list)
    _t0: float = 0.0
    _last: float = 0.0
    _untold: int = 0
    _next_tell: float = 0.0

    def woke(self, now: float, asked_s: float, polled_since: float) -> None:
        """The poll returned at `now`; it was entered at `polled_since` for at most `asked_s`."""
        self._marks.clear()
        self._t0 = self._last = now
        late = (now - polled_since) - asked_s
        if late > 0:
            self._marks.append((LATE, late))

    def lap(self, phase: str, now: float) -> None:
        self._marks.append((phase, now - self._last))
        self._last = now

    def done(self, now: float) -> Stall | None:
        """The stall this iteration was, if it was one."""
        late = self._marks[0][1] if self._marks and self._marks[0][0] == LATE else 0.0
        seconds = (now - self._t0) + late
        if seconds < self.slow_s:
            return None
        phases: dict[str, float] = {}
        for name, s in self._marks:
            phases[name] = phases.get(name, 0.0) + s
        phase = max(phases, key=phases.__getitem__)
        self.total += 1
        self.by_phase[phase] = self.by_phase.get(phase, 0) + 1
        self._untold += 1
        tell = now >= self._next_tell
        stall = Stall(seconds, phase, phases, self._untold, tell)
        if tell:
            self._next_tell, self._untold = now + self.tell_every_s, 0
        return stall
