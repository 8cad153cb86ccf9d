"""The wire protocol: every message survives the trip, and garbage is refused."""
from __future__ import annotations

import msgspec
import pytest

from appliance import protocol as P

SPEC = P.ChatTask(messages=[P.ChatMessage("user", "hello")], max_tokens=8, priority="high")
RECORD = P.TaskRecord(task_id="a" * 32, state="completed", type="chat", priority="high", created_at=1.0,
                      result=P.TaskResult(text="hi", timings=P.Timings(predicted_n=2)))

FRONT_REQUESTS = [P.Submit(1, SPEC, "tenant-a"), P.Query(2, "a" * 32), P.Ping(3)]
FRONT_REPLIES = [P.Accepted(1, "a" * 32, "queued"), P.TaskInfo(2, RECORD), P.Pong(3, 1, 0, 0, "cpu_only"),
                 P.Refused(4, "not_found", "no such task")]
TO_BROKER = [P.Ready("llama-0", "tiny", 2, "http://127.0.0.1:1"), P.Credit(2),
             P.Done("a" * 32, result=RECORD.result), P.Done("b" * 32, error=P.TaskError("timeout", "slow")),
             P.Heartbeat(), P.Disconnect()]
TO_WORKER = [P.Dispatch("a" * 32, SPEC, 12.5), P.Heartbeat(), P.Disconnect()]


@pytest.mark.parametrize("decoder, msgs", [
    (P.front_request, FRONT_REQUESTS), (P.front_reply, FRONT_REPLIES),
    (P.worker_to_broker, TO_BROKER), (P.broker_to_worker, TO_WORKER),
])
def test_round_trip(decoder, msgs):
    for msg in msgs:
        assert decoder.decode(P.encode(msg)) == msg


def test_telemetry_round_trip():
    t = P.Telemetry(1.0, "samples", False, "", [P.GpuReading(0, "RTX 3090", 24576, 12000, 49, 35)])
    assert P.telemetry.decode(P.encode(t)) == t


def test_a_message_meant_for_the_other_side_is_refused():
    with pytest.raises(msgspec.ValidationError):
        P.front_request.decode(P.encode(P.Credit(1)))
    with pytest.raises(msgspec.DecodeError):
        P.worker_to_broker.decode(b"\xc1garbage")


@pytest.mark.parametrize("body, where", [
    (b'{"type": "chat", "messages": null}', r"\$\.messages"),
    (b'{"type": "chat"}', "`messages`"),
    (b'{"type": "complete", "prompt": "x", "max_tokens": -1}', r"\$\.max_tokens"),
    (b'{"type": "embed", "texts": ["x"], "max_tokens": 4}', "`max_tokens`"),  # not a field of embed
    (b'{"type": "extract", "messages": [{"role": "user", "content": "x"}]}', "`json_schema`"),
    (b'{"type": "translate", "prompt": "x"}', r"\$\.type"),
])
def test_each_task_type_takes_exactly_its_fields(body, where):
    with pytest.raises(msgspec.ValidationError, match=where):
        msgspec.json.decode(body, type=P.TaskSpec)


def test_configured_bounds():
    spec = msgspec.json.decode(b'{"type": "complete", "prompt": "xyz", "timeout_s": 90}', type=P.TaskSpec)
    assert isinstance(spec, P.CompleteTask) and spec.type == "complete"
    assert P.check_bounds(spec, timeout_max_s=100, max_prompt_chars=3) is None
    assert P.check_bounds(spec, timeout_max_s=60)[0] == "timeout_s"
    assert P.check_bounds(spec, max_prompt_chars=2) == ("prompt", "3 characters; at most 2 "
                                                        "(MAX_PROMPT_CHARS)")


def test_priorities_are_ordered_levels():
    assert [P.LEVEL[p] for p in P.PRIORITIES] == [0, 1, 2, 3, 4]
    assert P.LEVEL["critical"] < P.LEVEL["normal"] < P.LEVEL["batch"]
