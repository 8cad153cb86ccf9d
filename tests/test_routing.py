"""The routing rule and the instances file, as pure functions: no sockets, no processes."""
from __future__ import annotations

import pytest

from appliance import instances
from appliance import protocol as P
from appliance.broker.routing import Candidate, Gpu, Limits, choose, gpu_state, throttled
from appliance.broker.routing import conversation_key
from appliance.config import ConfigError, load_settings


def cand(name, running=0, slots=2, reserved=0, low=None, free=None, spt=0.0, gpu=-1):
    return Candidate(name, slots - running if free is None else free, slots, running,
                     running if low is None else low, reserved, spt, gpu)


def test_least_busy_wins_and_speed_counts():
    assert choose([cand("a", running=1), cand("b")], False, {}).name == "b"
    # b runs one task but is four times faster per token: its expected finish is sooner
    fast_busy = [cand("a", spt=0.04), cand("b", running=1, spt=0.01, slots=4)]
    assert choose(fast_busy, False, {}).name == "b"


def test_reserved_slots_are_for_critical_and_high_only():
    only_reserved_free = [cand("a", slots=2, running=1, reserved=1)]  # its one normal task holds the other slot
    assert choose(only_reserved_free, urgent=False, gpus={}) is None
    assert choose(only_reserved_free, urgent=True, gpus={}).name == "a"
    # urgent tasks running in the non-reserved slots do not count against low work
    assert choose([cand("a", slots=2, running=1, low=0, reserved=1)], False, {}).name == "a"


def test_a_throttled_gpu_gets_nothing_new():
    hot = {1: Gpu(throttled=True)}
    pool = [cand("a", gpu=1), cand("b", running=1, gpu=0)]
    assert choose(pool, False, hot).name == "b"
    assert choose([cand("a", gpu=1)], True, hot) is None  # not even critical work
    assert choose(pool, False, {}).name == "a"


def test_affinity_holds_while_load_allows():
    pool = [cand("a", running=1, slots=4), cand("b", slots=4)]
    assert choose(pool, False, {}, affinity="a", slack=1).name == "a"  # one more than the least busy: kept
    busier = [cand("a", running=2, slots=4), cand("b", slots=4)]
    assert choose(busier, False, {}, affinity="a", slack=1).name == "b"  # two more: it moves
    assert choose([cand("a", free=0), cand("b")], False, {}, affinity="a").name == "b"  # full: it moves


def test_a_lost_task_avoids_the_instance_that_lost_it_when_it_can():
    assert choose([cand("a"), cand("b", running=1)], False, {}, avoid=frozenset({"a"})).name == "b"
    assert choose([cand("a")], False, {}, avoid=frozenset({"a"})).name == "a"  # the only one: retried there


def test_a_suspect_instance_gets_nothing_new_until_it_offers_work_again():
    """Its llama.cpp just failed a task as unreachable (it may be dying): a lost task waits
    for it rather than going straight back to it, and other work goes elsewhere."""
    from dataclasses import replace
    from appliance.broker.routing import claim_room
    dying = replace(cand("a"), suspect=True)
    assert choose([dying], True, {}, avoid=frozenset({"a"})) is None
    assert choose([dying, cand("b", running=1)], False, {}).name == "b"
    assert claim_room([dying], {}, queued=0) == (0, 0)  # a box does not claim shared work for it either


def test_low_gpu_memory_halves_the_appeal():
    pool = [cand("a", gpu=0), cand("b", gpu=1)]
    assert choose(pool, False, {0: Gpu(memory_free_fraction=0.01), 1: Gpu(memory_free_fraction=0.5)}).name == "b"


@pytest.mark.parametrize("was, temp, expected", [
    (False, 84.9, False), (False, 85.0, True), (True, 82.0, True), (True, 79.9, False), (False, 82.0, False),
])
def test_throttle_hysteresis(was, temp, expected):
    assert throttled(was, temp, throttle_c=85, resume_c=80) is expected


def test_a_conversation_keeps_its_key_across_turns():
    turn1 = P.ChatTask(messages=[P.ChatMessage("system", "You are terse."), P.ChatMessage("user", "Chest pain?")])
    turn2 = P.ChatTask(messages=[*turn1.messages, P.ChatMessage("assistant", "Describe it."),
                                 P.ChatMessage("user", "Sharp, left side.")])
    other = P.ChatTask(messages=[P.ChatMessage("system", "You are terse."), P.ChatMessage("user", "Fever?")])
    assert conversation_key(turn1, "t") == conversation_key(turn2, "t") != conversation_key(other, "t")
    assert conversation_key(turn1, "t") != conversation_key(turn1, "u")  # per tenant
    assert conversation_key(P.ChatTask(messages=turn1.messages, session_id="x"), "t") == \
        conversation_key(P.ChatTask(messages=other.messages, session_id="x"), "t")
    assert conversation_key(P.EmbedTask(texts=["a"]), "t") is None


# ------------------------------------------------------------------ the instances file
@pytest.fixture
def settings(tmp_path):
    return load_settings({"APPLIANCE_HOME": str(tmp_path), "LLAMA_SLOTS": "3"})


def test_without_a_file_three_instances_of_the_default_model(settings):
    found = instances.load(settings)
    assert [(i.name, i.alias, i.port, i.slots, i.reserved_slots) for i in found] == [
        ("llama-0", "appliance-tiny", 8080, 3, 1), ("llama-1", "appliance-tiny", 8081, 3, 1),
        ("llama-2", "appliance-tiny", 8084, 3, 1)]


def test_entries_default_to_the_settings_and_name_their_model(settings, tmp_path):
    gguf = tmp_path / "med-8b.gguf"
    text = f'''
[[instance]]
name = "fast"
model = "{gguf}"
slots = 1
gpu = 1
gpu_layers = 999
[[instance]]
name = "tiny"
'''
    fast, tiny = instances.parse(text, settings)
    assert (fast.alias, fast.slots, fast.reserved_slots, fast.gpu, fast.gpu_layers, fast.tiny) == \
        ("med-8b", 1, 0, 1, 999, False)
    assert (tiny.alias, tiny.slots, tiny.gpu, tiny.tiny) == ("appliance-tiny", 3, -1, True)
    assert instances.models([fast, tiny]) == ["med-8b", "appliance-tiny"]
    with pytest.raises(ConfigError, match="med-8b.gguf does not exist"):
        instances.check_files([fast, tiny])


@pytest.mark.parametrize("text, message", [
    ('[[instance]]\nname = "a"\nslots = 0', r"instance\[0\].slots"),
    ('[[instance]]\nname = "a"\nslotz = 2', "unknown field `slotz`"),
    ('[[instance]]\nname = "A b"', r"instance\[0\].name"),
    ('[[instance]]\nname = "a"\n[[instance]]\nname = "a"', "used twice"),
    ('[[instance]]\nname = "broker"', "taken by another program"),
    ('[[instance]]\nname = "a"\nslots = 2\nreserved_slots = 2', "fewer than slots"),
    ('[[instance]]\nname = "a"\nengine = "external"', "needs server_bin"),
    ('[[instance]]\nname = "a"\nmodel = "/m/x.gguf"\n[[instance]]\nname = "b"\nmodel = "/n/x.gguf"',
     "names two different files"),
    ("[[instance]\nname = 1", "not valid TOML"),
    ("", "instance"),
])
def test_a_malformed_file_is_refused_naming_the_key(settings, text, message):
    with pytest.raises(ConfigError, match=message):
        instances.parse(text, settings)


def test_the_supervisord_programs_are_generated_from_the_instances(settings):
    from appliance.ops.supervisor import programs_conf

    conf = programs_conf(instances.load(settings), "/var/log/app")
    assert "[group:llama]\nprograms=llama-0,llama-1,llama-2" in conf
    assert "[program:llama-2]\ncommand=python -m procs.llama llama-2" in conf
    assert "stdout_logfile=/var/log/app/llama-1.log" in conf


def reading(temp=50.0, used=1000.0, total=10000.0, **kw) -> P.GpuReading:
    return P.GpuReading(0, "gpu", total, used, temp, 10.0, **kw)


def test_gpu_state_goes_out_on_heat_slowdown_or_memory_and_says_why():
    limits = Limits(85, 80, 95)
    assert gpu_state(Gpu(), reading(), limits) == Gpu(False, 0.9, "")
    hot = gpu_state(Gpu(), reading(temp=86), limits)
    assert hot.throttled and "86 °C" in hot.reason
    slow = gpu_state(Gpu(), reading(temp=70, throttle_thermal=True), limits)  # the GPU slows itself below the mark
    assert slow.throttled and "thermal slowdown" in slow.reason
    assert "hardware slowdown" in gpu_state(Gpu(), reading(throttle_hardware=True), limits).reason
    full = gpu_state(Gpu(), reading(used=9600), limits)
    assert full.throttled and "memory 96 %" in full.reason
    assert not gpu_state(Gpu(), reading(throttle_power=True), limits).throttled  # a power cap only slows it


def test_gpu_state_comes_back_only_when_every_cause_clears_with_margin():
    limits = Limits(85, 80, 95)
    out = gpu_state(Gpu(), reading(temp=88, throttle_thermal=True), limits)
    still = gpu_state(out, reading(temp=82), limits)  # reason gone, not cool enough yet
    assert still.throttled and still.reason.startswith("cooling down")
    assert not gpu_state(still, reading(temp=80), limits).throttled
    full = gpu_state(Gpu(), reading(used=9500), limits)
    assert gpu_state(full, reading(used=9200), limits).throttled      # 92 %: within the 5-point margin
    assert not gpu_state(full, reading(used=8900), limits).throttled  # 89 %: back


def test_an_instance_never_takes_the_api_s_port(tmp_path):
    """Every program starts at once: an instance on the API's port (free until gunicorn
    binds it) would keep the API from ever starting."""
    from appliance.llama.server import free_port, port_for

    api = free_port()
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "API_PORT": str(api), "LLAMA_INSTANCES": "1"})
    import msgspec

    inst = msgspec.structs.replace(instances.load(s)[0], port=api)  # configured on it, or a kernel's pick
    assert port_for(s, inst) != api
    assert all(free_port(avoid=frozenset({p})) != p for p in (free_port() for _ in range(20)))


def test_claim_room_counts_what_the_instances_can_start_now():
    from appliance.broker.routing import Candidate, Gpu, claim_room

    def inst(name, free, slots=4, reserved=1, low_running=0, gpu=-1):
        return Candidate(name, free=free, slots=slots, running=slots - free, low_running=low_running,
                         reserved=reserved, gpu=gpu)
    # 4 slots, 1 reserved, nothing running: 3 for any work, 1 more for urgent work
    assert claim_room([inst("a", 4)], {}, queued=0) == (3, 1)
    # tasks it holds already count against the room
    assert claim_room([inst("a", 4)], {}, queued=2) == (1, 1)
    assert claim_room([inst("a", 4)], {}, queued=5) == (0, 0)
    # low work running fills the open slots: only the reserved one is left
    assert claim_room([inst("a", 1, low_running=3)], {}, queued=0) == (0, 1)
    # a throttled GPU takes nothing; two instances add up
    assert claim_room([inst("a", 4, gpu=0), inst("b", 2, slots=2, reserved=0)], {0: Gpu(throttled=True)},
                      queued=0) == (2, 0)
