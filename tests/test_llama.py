"""The launcher's side: the generated GGUF in real llama.cpp, and the task runner."""
from __future__ import annotations

import hashlib
import time

import gguf
import msgspec
import pytest

from appliance import instances
from appliance import protocol as P
from appliance.config import load_settings
from appliance.llama.client import LlamaClient
from appliance.llama.tasks import run_task
from appliance.llama.server import ServerStartError, free_port, start_server


def settings_for(tmp_path, model, **extra):
    env = {"APPLIANCE_HOME": str(tmp_path), "MODEL_PATH": str(model), "LLAMA_SLOTS": "1"}
    env.update(extra)
    return load_settings(env)


def instance(s):
    """The settings' first default instance, on any free port."""
    return msgspec.structs.replace(instances.default_instances(s)[0], port=0)


def test_generated_model_is_a_llama_gguf_with_chat_template(tiny_model):
    fields = gguf.GGUFReader(str(tiny_model)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types.count(6) == 256  # byte fallback: one token per byte
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(types)
    assert tiny_model.stat().st_size < 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    s = settings_for(tmp_path_factory.mktemp("llama"), tiny_model, LLAMA_CTX="512")
    srv = start_server(s, instance(s))
    yield srv
    srv.stop()


def test_chat_and_completion_against_llama_cpp(server):
    client = LlamaClient(server.base_url)
    chat = P.ChatTask(messages=[P.ChatMessage("user", "hello")], max_tokens=8, temperature=0.0)
    done = run_task(client, "tiny", "t1", chat, time.time() + 30)
    assert done.error is None, done.error
    assert done.result.text and done.result.completion_tokens == 8
    assert done.result.timings.predicted_n == 8
    again = run_task(client, "tiny", "t2", chat, time.time() + 30)
    assert again.result.text == done.result.text  # greedy is deterministic
    comp = run_task(client, "tiny", "t3", P.CompleteTask(prompt="the", max_tokens=5), time.time() + 30)
    assert comp.result.completion_tokens == 5


def test_prompt_over_the_context_fails_with_a_reason(server):
    client = LlamaClient(server.base_url)
    spec = P.CompleteTask(prompt="patient " * 2000, max_tokens=4)
    done = run_task(client, "tiny", "t", spec, time.time() + 30)
    assert done.result is None
    assert done.error.code == "context_exceeded" and "exceed_context_size" in done.error.message


def test_passed_deadline_is_a_timeout(server):
    spec = P.CompleteTask(prompt="x", max_tokens=4)
    done = run_task(LlamaClient(server.base_url), "tiny", "t", spec, time.time() - 1)
    assert done.error.code == "timeout"


def test_unreachable_llama_is_reported_not_raised():
    spec = P.CompleteTask(prompt="x", max_tokens=4)
    done = run_task(LlamaClient(f"http://127.0.0.1:{free_port('127.0.0.1')}"), "tiny", "t", spec, time.time() + 5)
    assert done.error.code == "llama_unavailable"


def test_garbage_model_fails_fast_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="refused to start"):
        start_server(s := settings_for(tmp_path, bad), instance(s))
    assert time.monotonic() - t0 < 5


def test_missing_external_binary_is_a_clear_error(tmp_path, tiny_model):
    s = settings_for(tmp_path, tiny_model, LLAMA_SERVER_BIN=str(tmp_path / "llama-server"))
    with pytest.raises(ServerStartError, match="not an executable"):
        start_server(s, instance(s))


def test_a_result_says_what_produced_it_and_can_be_run_again(server, tiny_model, tmp_path):
    """Provenance: the model file's SHA-256 and quantization, the instance, and every
    sampling parameter with the seed in force; with them the same output comes again."""
    from appliance.llama.provenance import quantization_of, sha256_of

    digest = sha256_of(tiny_model, tmp_path)
    assert digest == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert sha256_of(tiny_model, tmp_path) == digest and (tmp_path / "model-hashes.json").exists()  # cached
    base = P.Provenance(model="tiny", gguf_sha256=digest, quantization=quantization_of(tiny_model), instance="i")
    client = LlamaClient(server.base_url)
    spec = P.ChatTask(messages=[P.ChatMessage("user", "hello")], max_tokens=12)  # no seed, no temperature given
    first = run_task(client, "tiny", "p1", spec, time.time() + 30, provenance=base).result
    prov = first.provenance
    assert (prov.gguf_sha256, prov.quantization, prov.instance) == (digest, "F32", "i")
    assert prov.sampling.temperature == 0.8 and prov.sampling.max_tokens == 12 and prov.sampling.seed >= 0
    again = msgspec.structs.replace(spec, temperature=prov.sampling.temperature, seed=prov.sampling.seed)
    assert run_task(client, "tiny", "p2", again, time.time() + 30, provenance=base).result.text == first.text
