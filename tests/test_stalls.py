"""The broker loop's stall bookkeeping (appliance/broker/stalls.py), on a clock we drive."""
from __future__ import annotations

from appliance.broker.stalls import LATE, LoopClock


def iteration(clock: LoopClock, start: float, phases: list[tuple[str, float]], asked: float = 1.0,
              polled_for: float = 0.0):
    """One loop iteration woken at `start` after `polled_for` s in a poll asked for `asked` s."""
    clock.woke(start, asked, start - polled_for)
    t = start
    for name, seconds in phases:
        t += seconds
        clock.lap(name, t)
    return clock.done(t)


def test_a_quick_iteration_is_no_stall():
    clock = LoopClock()
    assert iteration(clock, 100.0, [("messages", 0.01), ("journal commit", 0.2)]) is None
    assert clock.total == 0


def test_a_slow_commit_is_named():
    clock = LoopClock()
    stall = iteration(clock, 100.0, [("messages", 0.01), ("journal commit", 1.2), ("replies", 0.002)])
    assert stall is not None and stall.tell and stall.phase == "journal commit"
    assert abs(stall.seconds - 1.212) < 1e-9
    assert "mostly journal commit" in stall.describe() and "messages 0.010s" in stall.describe()
    assert clock.by_phase == {"journal commit": 1}


def test_a_late_wake_up_is_the_machine_not_the_loop():
    """Asked to wait 0.5 s, the poll returned after 2.5 s: 2 s nobody ran the broker."""
    clock = LoopClock()
    stall = iteration(clock, 100.0, [("messages", 0.001)], asked=0.5, polled_for=2.5)
    assert stall is not None and stall.phase == LATE and abs(stall.seconds - 2.001) < 1e-9


def test_an_early_wake_up_is_not_late():
    clock = LoopClock()
    assert iteration(clock, 100.0, [("messages", 0.001)], asked=1.0, polled_for=0.2) is None


def test_stalls_are_counted_always_and_told_at_most_every_ten_seconds():
    clock = LoopClock()
    told = [iteration(clock, t, [("journal commit", 0.5)]).tell for t in (100.0, 101.0, 105.0, 111.0)]
    assert told == [True, False, False, True]
    assert clock.total == 4 and clock.by_phase == {"journal commit": 4}
    last = iteration(clock, 122.0, [("claims", 0.3)])
    assert last.tell and last.untold == 1 and "more since" not in last.describe()


def test_the_report_says_how_many_were_not_told():
    clock = LoopClock()
    iteration(clock, 100.0, [("journal commit", 0.5)])
    iteration(clock, 101.0, [("journal commit", 0.5)])
    stall = iteration(clock, 111.0, [("journal commit", 0.5)])
    assert stall.tell and stall.untold == 2 and "1 more since the last report" in stall.describe()


def test_the_loop_laps_exactly_the_phases_the_metric_is_made_for():
    """The counter's series are created for stalls.PHASES at start (so that increase() sees
    the first stall); the loop must lap those names and no others."""
    import re
    from pathlib import Path

    from appliance.broker.stalls import PHASES
    src = (Path(__file__).parent.parent / "appliance" / "broker" / "server.py").read_text()
    lapped = re.findall(r'clock\.lap\("([^"]+)"', src)
    assert tuple(lapped) + (LATE,) == PHASES
