"""The native scheduling core, and the same rules in the pure-Python reference."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.broker._pqueue import PriorityQueue, QueueFull
from appliance.broker.refqueue import QueueFull as RefQueueFull
from appliance.broker.refqueue import RefPriorityQueue

IMPLS = [PriorityQueue, RefPriorityQueue]


@pytest.fixture(params=IMPLS, ids=["native", "reference"])
def Q(request):
    return request.param


def test_priority_order_and_fifo_within_a_level(Q):
    q = Q(5, 100)
    for handle, level in [(1, 2), (2, 4), (3, 0), (4, 2), (5, 0), (6, 1)]:
        q.push(handle, level, 0.0)
    assert [q.pop(0.0) for _ in range(6)] == [3, 5, 6, 1, 4, 2]
    assert q.pop(0.0) == -1 and len(q) == 0


def test_bound_is_enforced_and_frees_on_pop(Q):
    q = Q(5, 3)
    for h in range(3):
        q.push(h, 2, 0.0)
    with pytest.raises((QueueFull, RefQueueFull)):
        q.push(99, 2, 0.0)
    assert q.pop(0.0) == 0
    q.push(99, 2, 0.0)
    assert len(q) == 3


def test_cancel_is_skipped_and_frees_room(Q):
    q = Q(5, 3)
    for h in (10, 11, 12):
        q.push(h, 3, 0.0)
    assert q.cancel(11) is True
    assert q.cancel(11) is False and q.cancel(404) is False
    assert 11 not in q and 10 in q
    assert q.depth(3) == 2
    q.push(13, 3, 0.0)  # the cancelled slot counts no more
    assert [q.pop(0.0) for _ in range(3)] == [10, 12, 13]


def test_aging_lets_a_long_waiting_task_overtake(Q):
    q = Q(5, 100, aging_s=10.0)
    q.push(1, 4, 0.0)     # batch, enqueued at t=0
    q.push(2, 0, 40.5)    # critical, enqueued at t=40.5
    # at t=41 the batch task's effective level is 4 - 41/10 = -0.1, the critical one's 0 - 0.05
    assert q.pop(41.0) == 1
    assert q.pop(41.0) == 2
    q.push(3, 4, 50.0)
    q.push(4, 0, 50.0)
    assert q.pop(50.0) == 4  # without waiting, priority rules


def test_duplicate_handle_and_bad_level_are_refused(Q):
    q = Q(5, 10)
    q.push(1, 0, 0.0)
    with pytest.raises(ValueError):
        q.push(1, 1, 0.0)
    with pytest.raises(ValueError):
        q.push(2, 5, 0.0)
    with pytest.raises(ValueError):
        q.push(2, -1, 0.0)


def test_tenants_take_turns_within_a_level(Q):
    q = Q(5, 100)
    for h in range(10):
        q.push(h, 2, 0.0, "flood")
    q.push(100, 2, 1.0, "quiet")
    q.push(101, 2, 1.0, "quiet")
    q.push(200, 1, 2.0, "flood")  # a more urgent level still goes first
    got = [q.pop(5.0) for _ in range(6)]
    assert got == [200, 0, 100, 1, 101, 2]


def test_position_counts_what_runs_first(Q):
    q = Q(5, 100)
    for h in range(4):
        q.push(h, 2, 0.0, "a")
    q.push(10, 2, 0.0, "b")
    q.push(11, 2, 0.0, "b")
    q.push(20, 0, 0.0, "c")
    # serving order: 20, then a/b alternate: 0, 10, 1, 11, 2, 3
    order = [20, 0, 10, 1, 11, 2, 3]
    assert [q.position(h) for h in order] == list(range(7))
    assert q.position(999) == -1
    q.cancel(0)
    assert q.position(10) == 2  # 20, then a (its turn comes first), then 10


def test_native_handles_many_entries_and_cancels():
    q = PriorityQueue(5, 100_000)
    for h in range(50_000):
        q.push(h, h % 5, 0.0)
    for h in range(0, 50_000, 2):
        assert q.cancel(h)
    got = [q.pop(0.0) for _ in range(25_000)]
    assert q.pop(0.0) == -1
    expected = sorted(range(1, 50_000, 2), key=lambda h: (h % 5, h))
    assert got == expected


@settings(max_examples=50, deadline=None)
@given(handles=st.lists(st.integers(-2**63, 2**63 - 1), unique=True, min_size=1, max_size=300), data=st.data())
def test_native_hash_finds_every_handle_after_random_cancels(handles, data):
    q = PriorityQueue(5, 300)
    for h in handles:
        q.push(h, 2, 0.0)
    gone = set(data.draw(st.lists(st.sampled_from(handles), unique=True)))
    for h in gone:
        assert q.cancel(h)
    for h in handles:
        assert (h in q) == (h not in gone)
    assert [q.pop(0.0) for _ in range(len(handles) - len(gone))] == [h for h in handles if h not in gone]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 40), st.integers(0, 4), st.floats(0, 100),
                  st.sampled_from(["", "a", "b", "c"])),
        st.tuples(st.just("pop"), st.floats(0, 200)),
        st.tuples(st.just("cancel"), st.integers(0, 40)),
        st.tuples(st.just("depth"), st.integers(0, 4)),
        st.tuples(st.just("position"), st.integers(0, 40)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, max_size=st.integers(1, 20), aging=st.sampled_from([0.0, 1.0, 25.0]))
def test_native_and_reference_agree(ops, max_size, aging):
    native, ref = PriorityQueue(5, max_size, aging), RefPriorityQueue(5, max_size, aging)
    clock = 0.0
    for op in ops:
        name, *args = op
        if name == "push":
            handle, level, dt, tenant = args
            clock += dt  # time only moves forward, as in the broker
            results = []
            for q in (native, ref):
                try:
                    q.push(handle, level, clock, tenant)
                    results.append("ok")
                except (QueueFull, RefQueueFull):
                    results.append("full")
                except ValueError:
                    results.append("dup")
            assert results[0] == results[1], (op, results)
        elif name == "pop":
            now = clock + args[0]
            assert native.pop(now) == ref.pop(now), op
        elif name == "cancel":
            assert native.cancel(args[0]) == ref.cancel(args[0]), op
        elif name == "position":
            assert native.position(args[0]) == ref.position(args[0]), op
        else:
            assert native.depth(args[0]) == ref.depth(args[0]), op
        assert len(native) == len(ref)
