"""The whole HTTP API as application developers meet it: the official `openai`
client, SSE streams, extract/embed tasks, idempotency, and schemathesis fuzzing
over the served OpenAPI document. Real appliance under supervisord, tiny model."""
from __future__ import annotations

import json

import os
import re
import subprocess
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from conftest import BIN, running_appliance, wait_until

MODEL = "appliance-tiny"
SCHEMA = {"type": "object", "properties": {
    "sex": {"enum": ["female", "male", "unknown"]},
    "age": {"type": "integer"},
    "smoker": {"type": "boolean"},
    "codes": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
}, "required": ["sex", "age", "smoker"]}


@pytest.fixture(scope="module")
def client(appliance):
    return openai.OpenAI(base_url=appliance.url + "/v1", api_key=appliance.token, max_retries=0, timeout=30)


def final_result(app, task_id):
    def done():
        r = app.get(f"/v1/async/result/{task_id}")
        return r.json() if r.status_code == 200 else None
    return wait_until(done, 30, 0.05, f"task {task_id}")


def sse_events(resp) -> list[tuple[str, str]]:
    events, kind = [], "message"
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            events.append((kind, line[5:].strip()))
            kind = "message"
    return events


# ------------------------------------------------------------------ OpenAI client
def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_streamed_chat_matches_the_whole_answer(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=40, temperature=0, seed=1)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 40


def test_completion_and_streamed_completion(client):
    r = client.completions.create(model=MODEL, prompt="The patient", max_tokens=6)
    assert r.choices[0].text and r.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The patient", max_tokens=6, stream=True) if c.choices)
    assert streamed


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["chest pain", "no acute distress"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 64 and r.data[0].embedding != r.data[1].embedding


def test_structured_output_is_valid_json_for_the_schema(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "58 year old male smoker"}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "patient", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_unknown_model_and_bad_priority_are_client_errors(client, appliance):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    r = appliance.post("/v1/chat/completions", headers={"X-Priority": "urgent"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "X-Priority"
    r = appliance.post("/v1/chat/completions", headers={"X-Priority": "critical"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 200


def test_openai_calls_are_tasks_in_the_broker_queue(client, appliance):
    before = appliance.get("/v1/async/stats").json()["finished"].get("completed", 0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    after = appliance.get("/v1/async/stats").json()["finished"].get("completed", 0)
    assert after == before + 1


# ------------------------------------------------------------------ async task types
def test_extract_task(appliance):
    r = appliance.post("/v1/async/submit", json={"type": "extract", "max_tokens": 200, "json_schema": SCHEMA,
                                                 "messages": [{"role": "user", "content": "female, 40, no tobacco"}]})
    assert r.status_code == 202
    body = final_result(appliance, r.json()["task_id"])
    assert body["state"] == "completed", body
    data = body["result"]["data"]
    jsonschema.validate(data, SCHEMA)
    assert json.loads(body["result"]["text"]) == data


def test_extract_cut_short_fails_with_a_reason(appliance):
    r = appliance.post("/v1/async/submit", json={"type": "extract", "max_tokens": 3, "json_schema": SCHEMA,
                                                 "messages": [{"role": "user", "content": "x"}]})
    body = final_result(appliance, r.json()["task_id"])
    assert body["state"] == "failed" and body["error"]["code"] == "extract_invalid"


@pytest.mark.parametrize("schema, reason", [
    ({"type": 5}, "not a valid JSON Schema at type"),
    ({"type": "object", "required": "age"}, "not a valid JSON Schema at required"),
    ({"type": "array", "minItems": -1}, "not a valid JSON Schema at minItems"),
])
def test_a_json_schema_that_is_not_one_is_refused_up_front(appliance, schema, reason):
    r = appliance.post("/v1/async/submit", json={"type": "extract", "json_schema": schema,
                                                 "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "json_schema"
    assert reason in r.json()["error"]["message"]


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^[0-9]{3}$", "maxLength": 3},  # beyond the grammar: validated after
    {"type": "object", "properties": {"x": {"$ref": "https://example.org/never-fetched.json"}}, "required": ["x"]},
])
def test_what_the_grammar_cannot_express_is_still_validated(appliance, schema):
    """Accepted (it is a JSON Schema), and the result is valid against all of it or the task
    fails with a reason: a remote $ref is never fetched, so it can only fail."""
    r = appliance.post("/v1/async/submit", json={"type": "extract", "json_schema": schema, "max_tokens": 64,
                                                 "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 202, r.text
    body = final_result(appliance, r.json()["task_id"])
    if body["state"] == "completed":
        jsonschema.validate(body["result"]["data"], schema)
        assert "$ref" not in json.dumps(schema)
    else:
        assert body["state"] == "failed" and body["error"]["code"] == "extract_invalid", body


def test_embed_task(appliance):
    r = appliance.post("/v1/async/submit", json={"type": "embed", "texts": ["a", "b", "c"]})
    body = final_result(appliance, r.json()["task_id"])
    assert body["state"] == "completed" and len(body["result"]["embeddings"]) == 3


def test_stream_endpoint_sends_tokens_then_the_result(appliance):
    task_id = appliance.post("/v1/async/submit", json={"type": "complete", "prompt": "x", "max_tokens": 200}
                             ).json()["task_id"]
    with requests.get(f"{appliance.url}/v1/async/stream/{task_id}", stream=True, timeout=30,
                      headers=appliance.auth()) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(resp)
    tokens = "".join(json.loads(d)["text"] for k, d in events if k == "token")
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    result = json.loads(events[-1][1])
    assert result["state"] == "completed" and tokens == result["result"]["text"]


def test_stream_of_unknown_task_is_404(appliance):
    r = appliance.get("/v1/async/stream/" + "0" * 32)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_idempotency_key_gives_the_same_task(appliance):
    body = {"type": "complete", "prompt": "x", "max_tokens": 2}
    a = appliance.post("/v1/async/submit", json=body, headers={"Idempotency-Key": "order-17"}).json()["task_id"]
    b = appliance.post("/v1/async/submit", json=body, headers={"Idempotency-Key": "order-17"}).json()["task_id"]
    c = appliance.post("/v1/async/submit", json=body, headers={"Idempotency-Key": "order-18"}).json()["task_id"]
    assert a == b != c
    final_result(appliance, a)
    again = appliance.post("/v1/async/submit", json=body, headers={"Idempotency-Key": "order-17"}).json()
    assert again["task_id"] == a and again["state"] == "completed"


# ------------------------------------------------------------------ OpenAPI + fuzzing
def test_openapi_document_is_served(appliance):
    doc = appliance.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/async/submit", "/v1/chat/completions", "/v1/async/stream/{task_id}"} <= set(doc["paths"])
    submit = doc["paths"]["/v1/async/submit"]["post"]
    union = submit["requestBody"]["content"]["application/json"]["schema"]
    assert union["discriminator"]["propertyName"] == "type" and len(union["oneOf"]) == 5
    chat = doc["components"]["schemas"]["ChatTask"]
    assert "messages" in chat["required"] and chat["additionalProperties"] is False
    assert set(submit["responses"]["202"]["links"]) == {"status", "result", "stream", "cancel"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """An appliance of its own for the fuzzer, which submits thousands of tasks with the
    largest max_tokens and timeouts the document allows. Its bounds keep that work short
    (MAX_TOKENS_LIMIT=64, TASK_TIMEOUT_MAX_S=10, MAX_BATCH=20), so that its own
    synchronous OpenAI calls never wait behind minutes of its earlier work (they would end
    504/503, documented but 5xx); its rate limits are lifted, or its stateful phase would
    meet only 429s (the limits have tests of their own); its context is large enough for
    the prompts the document allows."""
    with running_appliance(tmp_path_factory, TASK_TIMEOUT_MAX_S="10", MAX_TOKENS_LIMIT="64", MAX_BATCH="20",
                           LLAMA_SLOTS="4", LLAMA_CTX="65536", MAX_PROMPT_CHARS="4000",
                           RATE_LIMITS="tasks:write=100000/s:100000,tasks:read=100000/s:100000") as app:
        yield app


FUZZ_SCOPES = ("tasks:read", "tasks:write", "gpu:read", "rag:read", "rag:write")


def test_fuzz_every_check_passes_and_links_reach_real_tasks(fuzzed, tmp_path):
    """schemathesis over every operation of the served document with every check: no
    server error, every response as documented, schema-valid requests accepted and
    invalid ones refused; its stateful phase follows the document's links from a
    submit's task id to status, result, stream and cancel. Its CLI drives it: its pytest
    plugin does not load on pytest 9. FUZZ_SEED picks another seed."""
    seed = os.environ.get("FUZZ_SEED", "20261127")
    out = subprocess.run(
        [str(BIN / "schemathesis"), "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
         fuzzed.url + "/openapi.json", "--max-examples", "25", "--seed", seed,
         "-H", f"Authorization: Bearer {fuzzed.mint('fuzzer', *FUZZ_SCOPES)}",
         "--checks", "all", "--no-color"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path)
    # the report without its (long) reproduction commands, each line cut short
    report = "\n".join(line[:300] for line in out.stdout.splitlines() if not line.startswith("    curl "))
    assert out.returncode == 0, report[-12000:] + out.stderr[-2000:]
    assert " passed" in report and "Tested: 26" in report, report[-3000:]
    links = re.search(r"API Links:\s+(\d+) covered", report)
    assert links and int(links.group(1)) >= 4, report[-3000:]  # at least submit -> each id operation
    assert "{task_id}" not in report.partition("Missing test data")[2], report[-3000:]  # ids came from links
