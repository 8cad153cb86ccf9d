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


def test_front_push_goes_to_the_head_of_its_tenants_fifo(Q):
    q = Q(5, 100)
    for h in (1, 2, 3):
        q.push(h, 2, 0.0, "a")
    q.push(4, 2, 5.0, "a", front=True)
    q.push(5, 2, 6.0, "a", True)  # positional too; the latest front push runs first
    assert [q.pop(10.0) for _ in range(6)] == [5, 4, 1, 2, 3, -1]


def test_front_push_makes_its_tenant_served_next_and_keeps_the_others_order(Q):
    q = Q(5, 100)
    for h, t in [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b"), (6, "c")]:
        q.push(h, 2, 0.0, t)
    q.push(9, 2, 1.0, "b", front=True)
    # b first, then the rotation as it was without b: a, c, b, ...
    assert [q.pop(2.0) for _ in range(7)] == [9, 1, 3, 2, 4, 6, 5]


def test_front_push_of_an_idle_tenant_joins_the_rotation_at_its_head(Q):
    q = Q(5, 100)
    for h, t in [(1, "a"), (2, "a"), (3, "b")]:
        q.push(h, 2, 0.0, t)
    q.push(9, 2, 1.0, "c", front=True)  # c had nothing queued: it goes first anyway
    q.push(10, 2, 1.0, "d")  # a plain push of an idle tenant still joins at the back
    assert [q.pop(2.0) for _ in range(5)] == [9, 1, 3, 10, 2]
    # a more urgent level still goes first, a front push only reorders its own level
    q.push(20, 3, 3.0, "a", front=True)
    q.push(21, 1, 3.0, "a")
    assert [q.pop(3.0) for _ in range(3)] == [21, 20, -1]


def test_front_push_keeps_its_original_arrival_for_aging(Q):
    q = Q(5, 100, aging_s=10.0)
    q.push(1, 1, 30.0)                 # high, arrived at t=30
    q.push(2, 3, 0.0, front=True)      # requeued, originally arrived at t=0
    # at t=31: level 3 - 31/10 = -0.1 beats level 1 - 1/10 = 0.9
    assert q.pop(31.0) == 2
    assert q.pop(31.0) == 1


def test_front_push_checks_like_a_plain_push(Q):
    q = Q(5, 2)
    q.push(1, 2, 0.0, "a", front=True)
    with pytest.raises(ValueError):
        q.push(1, 2, 0.0, "a", front=True)
    with pytest.raises(ValueError):
        q.push(2, 5, 0.0, "a", front=True)
    q.push(2, 2, 0.0, "b", front=True)
    with pytest.raises((QueueFull, RefQueueFull)):
        q.push(3, 2, 0.0, "a", front=True)
    assert q.cancel(1) and q.depth(2) == 1 and q.pop(0.0) == 2 and len(q) == 0


def test_position_follows_front_pushes(Q):
    q = Q(5, 100)
    for h, t in [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b"), (6, "c")]:
        q.push(h, 2, 0.0, t)
    q.push(9, 2, 1.0, "b", front=True)
    q.push(8, 2, 1.0, "a", front=True)
    q.push(7, 0, 1.0, "z", front=True)
    # rotation after the front pushes: a, b, c, each led by its requeued task
    order = [7, 8, 9, 3, 1, 2, 6, 4, 5]
    assert [q.position(h) for h in order] == list(range(len(order)))
    assert [q.pop(2.0) for _ in range(len(order))] == order


def test_pop_with_max_level_only_takes_the_urgent_levels(Q):
    q = Q(5, 100)
    for h, level in [(1, 3), (2, 1), (3, 4), (4, 0), (5, 2), (6, 1)]:
        q.push(h, level, 0.0)
    assert q.pop(0.0, max_level=1) == 4
    assert q.pop(0.0, 1) == 2
    assert q.pop(0.0, 1) == 6
    assert q.pop(0.0, 1) == -1       # levels 2..4 still hold work, none of it qualifies
    assert q.pop(0.0, 0) == -1
    assert len(q) == 3
    assert q.pop(0.0, 2) == 5
    assert q.pop(0.0, 5) == 1        # max_level >= levels: all levels
    assert q.pop(0.0, 99) == 3
    assert q.pop(0.0, 99) == -1


def test_pop_default_and_minus_one_mean_all_levels(Q):
    q = Q(5, 100)
    q.push(1, 4, 0.0)
    assert q.pop(0.0, -1) == 1
    q.push(2, 4, 0.0)
    assert q.pop(0.0) == 2
    with pytest.raises(ValueError):
        q.pop(0.0, -2)


def test_pop_max_level_is_by_declared_level_and_ages_within_it(Q):
    q = Q(5, 100, aging_s=10.0)
    q.push(1, 4, 0.0)    # batch, aged far below every other score by t=100
    q.push(2, 1, 0.0)    # high, waiting long
    q.push(3, 0, 99.0)   # critical, just arrived
    # batch's score is -6 but it is not in 0..1; among those, the aged high one wins
    assert q.pop(100.0, max_level=1) == 2
    assert q.pop(100.0, max_level=1) == 3
    assert q.pop(100.0, max_level=1) == -1
    assert q.pop(100.0) == 1


def test_pop_with_max_level_keeps_the_tenant_rotation(Q):
    q = Q(5, 100)
    for h, t in [(1, "a"), (2, "a"), (3, "b"), (4, "b")]:
        q.push(h, 1, 0.0, t)
    q.push(9, 3, 0.0, "a")
    assert [q.pop(0.0, 1) for _ in range(5)] == [1, 3, 2, 4, -1]
    assert q.pop(0.0) == 9


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


# half the pushes share level 2, so that several tenants often meet in one rotation
level = st.one_of(st.just(2), st.integers(0, 4))
tenant = st.sampled_from(["", "a", "b", "c"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 40), level, st.floats(0, 100), tenant),
        # a requeue at the front of its level, with its original (earlier) arrival time
        st.tuples(st.just("front"), st.integers(0, 40), level, st.floats(0, 150), tenant),
        st.tuples(st.just("pop"), st.floats(0, 200), st.integers(-1, 6)),
        st.tuples(st.just("cancel"), st.integers(0, 40)),
        st.tuples(st.just("depth"), st.integers(0, 4)),
        st.tuples(st.just("position"), st.integers(0, 40)),
        st.tuples(st.just("positions")),
    ),
    # hypothesis averages about min_size * 2 ops (only ~5 with no minimum): long enough
    # runs for several tenants to share a rotation and queues to fill up and drain
    min_size=25,
    max_size=200,
)


@settings(max_examples=500, deadline=None)
@given(ops=ops, max_size=st.integers(1, 20), aging=st.sampled_from([0.0, 1.0, 25.0]))
def test_native_and_reference_agree(ops, max_size, aging):
    native, ref = PriorityQueue(5, max_size, aging), RefPriorityQueue(5, max_size, aging)
    clock = 0.0
    for op in ops:
        name, *args = op
        if name in ("push", "front"):
            handle, level, dt, tenant = args
            if name == "push":
                clock += dt  # time only moves forward, as in the broker
                when, front = clock, False
            else:
                when, front = clock - dt, True  # requeued: it arrived earlier
            results = []
            for q in (native, ref):
                try:
                    q.push(handle, level, when, tenant, front=front)
                    results.append("ok")
                except (QueueFull, RefQueueFull):
                    results.append("full")
                except ValueError:
                    results.append("dup")
            assert results[0] == results[1], (op, results)
        elif name == "pop":
            now, max_level = clock + args[0], args[1]
            call = (now,) if max_level == -1 else (now, max_level)  # -1: the default
            assert native.pop(*call) == ref.pop(*call), op
        elif name == "cancel":
            assert native.cancel(args[0]) == ref.cancel(args[0]), op
        elif name == "position":
            assert native.position(args[0]) == ref.position(args[0]), op
        elif name == "positions":
            assert [native.position(h) for h in range(41)] == [ref.position(h) for h in range(41)], op
        else:
            assert native.depth(args[0]) == ref.depth(args[0]), op
        assert len(native) == len(ref)
    # position() is not only agreed on but right: without aging, draining the queue
    # serves every task at the position it was given
    if aging == 0.0:
        queued = [h for h in range(41) if h in native]
        expected = sorted(queued, key=native.position)
        assert sorted(native.position(h) for h in queued) == list(range(len(queued)))
        drained = []
        while (h := native.pop(clock)) != -1:
            assert ref.pop(clock) == h
            drained.append(h)
        assert ref.pop(clock) == -1
        assert drained == expected
