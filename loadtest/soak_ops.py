"""The soak's operations, one per thing a client does (see soak.py's docstring), and
the --mix that weighs them. Each op checks what a client would rely on: a stream that
stops short, or a task that ends other than completed, is an error, not a pass.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from typing import TYPE_CHECKING

import requests

if TYPE_CHECKING:  # soak_load imports this module: the name serves the annotations only
    from soak_load import Load

DEFAULT_MIX = "async_complete=2,async_chat=2,async_stream=1,openai_chat=1,openai_stream=2"
PROMPT = "Summarise: 58 y/o, vitals stable, afebrile."


def error_code(r: requests.Response) -> str:
    """The API's error code in a failed response, or "" when the body has none."""
    try:
        return r.json()["error"]["code"]
    except Exception:
        return ""


def _chat_body(rng: random.Random, max_tokens: int) -> dict:
    return {"type": "chat", "messages": [{"role": "user", "content": f"{PROMPT} Case {rng.randrange(10**6)}."}],
            "max_tokens": max_tokens}


def op_async_complete(load: Load, s, rng) -> None:
    body = {"type": "complete", "prompt": f"{PROMPT} Case {rng.randrange(10**6)}. Plan:",
            "max_tokens": load.args.max_tokens}
    if task_id := load.submit(s, body):
        load.poll(s, task_id)


def op_async_chat(load: Load, s, rng) -> None:
    if task_id := load.submit(s, _chat_body(rng, load.args.max_tokens)):
        load.poll(s, task_id)


def sse_events(r: requests.Response):
    """(event, data) pairs of a server-sent-events body; comments (keep-alives) skipped."""
    event, data = None, []
    for line in r.iter_lines(decode_unicode=True):
        if line is None:
            continue
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        yield event, "\n".join(data)


def op_async_stream(load: Load, s, rng) -> None:
    task_id = load.submit(s, _chat_body(rng, load.args.max_tokens))
    if not task_id:
        return
    path = f"/v1/async/stream/{task_id}"
    t0 = time.perf_counter()
    try:
        with s.get(load.url + path, stream=True, timeout=load.args.request_timeout) as r:
            if r.status_code != 200:
                load.stats.add("stream", error=f"http {r.status_code} {error_code(r)}", detail=path)
                return
            final = None
            for event, data in sse_events(r):
                if event == "result":
                    final = json.loads(data)
                elif event == "error":
                    code = json.loads(data).get("error", {}).get("code", "?")
                    load.stats.add("stream", error=f"error event {code}", detail=task_id)
                    return
    except requests.RequestException as exc:
        load.stats.add("stream", error=f"exception {type(exc).__name__}", detail=path)
        return
    if final is None:
        load.stats.add("stream", error="ended without its result event", detail=task_id)
        return
    load.stats.add("stream", (time.perf_counter() - t0) * 1000)
    load.seen_final(task_id, final)
    load.fetch_result(s, task_id)


def _openai_body(load: Load, rng, stream: bool) -> dict:
    return {"model": load.model, "max_tokens": load.args.max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": f"{PROMPT} Case {rng.randrange(10**6)}."}]}


def op_openai_chat(load: Load, s, rng) -> None:
    r = load.call(s, "chat", "POST", "/v1/chat/completions", json=_openai_body(load, rng, False))
    if r is not None and not r.json()["choices"][0].get("finish_reason"):
        load.stats.add("chat", error="answer without finish_reason")


def op_openai_stream(load: Load, s, rng) -> None:
    """Read to `data: [DONE]`; a stream that stops short is an error, and its task (the
    chunk id names it) joins the ones that must be final by the end."""
    path = "/v1/chat/completions"
    t0 = time.perf_counter()
    task_id, finish, done = None, None, False
    try:
        with s.post(load.url + path, json=_openai_body(load, rng, True), stream=True,
                    timeout=load.args.request_timeout) as r:
            if r.status_code != 200:
                load.stats.add("chat_stream", error=f"http {r.status_code} {error_code(r)}", detail=path)
                return
            for _, data in sse_events(r):  # read to the end of the body: the connection stays reusable
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    load.stats.add("chat_stream", error=f"error chunk {chunk['error'].get('code')}", detail=path)
                    return
                if task_id is None and chunk.get("id"):
                    task_id = chunk["id"].split("-", 1)[-1]
                    load.tasks.accept(task_id)
                for choice in chunk.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
    except requests.RequestException as exc:
        load.stats.add("chat_stream", error=f"exception {type(exc).__name__}", detail=path)
        return
    if not (done and finish):
        load.stats.add("chat_stream", error="ended without " + ("finish_reason" if done else "[DONE]"),
                       detail=task_id or "")
        return
    load.stats.add("chat_stream", (time.perf_counter() - t0) * 1000)
    if task_id:
        load.tasks.final(task_id, "completed")


RAG_QUERIES = ("chest pain radiating to the left arm", "type 2 diabetes without complications", "E11.9",
               "fracture of the neck of the femur", "community-acquired pneumonia", "heart attack")


def op_rag_search(load: Load, s, rng) -> None:
    """POST /v1/rag/search (the token needs rag:read): answered in one request, the
    search being a high-priority task the API waits for; an empty index answers []."""
    body = {"query": rng.choice(RAG_QUERIES), "k": 5, "mode": rng.choice(("hybrid", "vector", "keyword"))}
    r = load.call(s, "rag", "POST", "/v1/rag/search", json=body)
    if r is not None and not isinstance(r.json().get("hits"), list):
        load.stats.add("rag", error="no hits list in the answer", detail=r.text[:200])


OPS = {"async_complete": op_async_complete, "async_chat": op_async_chat, "async_stream": op_async_stream,
       "openai_chat": op_openai_chat, "openai_stream": op_openai_stream, "rag_search": op_rag_search}


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in OPS:
            raise argparse.ArgumentTypeError(f"unknown operation {name!r} (known: {', '.join(OPS)})")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: weight {weight!r} is not a number") from None
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"{name}: negative weight")
    mix = {k: v for k, v in mix.items() if v > 0}
    if not mix:
        raise argparse.ArgumentTypeError("the mix has no operation with a weight above 0")
    return mix
