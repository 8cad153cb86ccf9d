"""The memory forecast against llama.cpp's own account of a load, and its pure logic.

Why: a planner that disagrees with llama.cpp refuses models that fit or starts ones that
do not. The validation loads generated models of different shapes in the real llama.cpp
(tests/support/llama_server.py, the xllamacpp wheel, CPU) at verbosity 4, where it logs
each buffer it allocates, and compares those sizes with the forecast, part by part.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import pytest

from appliance.gpu.gguf_meta import ModelMeta, ModelMetaError, read_meta
from appliance.gpu.planner import KV_PAD, best_fit, fits, forecast
from appliance.llama.tinymodel import TinySpec, write_tiny_model

SERVER = Path(__file__).resolve().parent / "support" / "llama_server.py"

# The lines llama.cpp logs at load (verbosity 4), e.g.
#   load_tensors:   CPU_Mapped model buffer size =     2.87 MiB
#   llama_context:        CPU  output buffer size =     0.00 MiB
#   llama_kv_cache:        CPU KV buffer size =     4.00 MiB
#   sched_reserve:        CPU compute buffer size =     3.77 MiB
BUFFERS = {
    "weights": re.compile(r"load_tensors:\s+\S+ model buffer size =\s+([\d.]+) MiB"),
    "output": re.compile(r"llama_context:\s+\S+\s+output buffer size =\s+([\d.]+) MiB"),
    "kv": re.compile(r"llama_kv_cache:\s+\S+ KV buffer size =\s+([\d.]+) MiB"),
    "compute": re.compile(r"sched_reserve:\s+\S+ compute buffer size =\s+([\d.]+) MiB"),
}

MODELS = {  # widths, depths, feed-forward ratios and contexts that take different branches
    "e64-L2": TinySpec(n_embd=64, n_layer=2, n_head=2, n_ff=256, n_ctx=1024),
    "e256-L4": TinySpec(n_embd=256, n_layer=4, n_head=8, n_ff=384, n_ctx=4096),   # n_ff < 2 n_embd
    "e384-L6": TinySpec(n_embd=384, n_layer=6, n_head=6, n_ff=1152, n_ctx=8192),
}

# (model, n_ctx, n_parallel, kv type, llama-server flags, forecast options)
CASES = [
    ("e64-L2", 1024, 1, "f16", [], {}),
    ("e64-L2", 2048, 4, "q8_0", [], {}),
    ("e64-L2", 600, 1, "f32", [], {}),                                   # KV padded to 768
    ("e256-L4", 4096, 2, "f16", [], {}),
    ("e256-L4", 1000, 3, "f16", [], {}),                                 # 3 x 512 cells
    ("e256-L4", 2048, 1, "f16", ["--flash-attn", "off"], {"flash_attn": False}),
    ("e256-L4", 2048, 2, "f16", ["--embeddings"], {"embeddings": True}),
    ("e384-L6", 8192, 4, "q4_0", [], {}),
    ("e384-L6", 4096, 1, "f16", ["--ubatch-size", "256"], {"n_ubatch": 256}),
    ("e384-L6", 2048, 2, "bf16", ["--kv-unified", "--embeddings"], {"kv_unified": True, "embeddings": True}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("planner")
    return {name: write_tiny_model(d / f"{name}.gguf", spec) for name, spec in MODELS.items()}


def llama_buffers(model: Path, n_ctx: int, n_parallel: int, kv_type: str, flags: list[str]) -> dict[str, float]:
    """Load the model in real llama.cpp; the MiB of each buffer kind it logged (summed over devices)."""
    cmd = [sys.executable, str(SERVER), "--model", str(model), "--port", "0", "--ctx-size", str(n_ctx),
           "--parallel", str(n_parallel), "--threads", "1", "--verbosity", "4",
           "--cache-type-k", kv_type, "--cache-type-v", kv_type, *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, proc.kill)  # a silent hang ends the read below
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
    finally:  # SIGKILL: a SIGTERM that lands before the server's loop runs can be lost
        watchdog.cancel()
        proc.kill()
        proc.wait(10)
        proc.stderr.close()
    log = "".join(lines)
    assert "listening on" in log, f"llama.cpp did not start: {' '.join(cmd)}\n{log[-3000:]}"
    return {k: sum(float(v) for v in p.findall(log)) for k, p in BUFFERS.items()} | {
        "_seen": {k for k, p in BUFFERS.items() if p.search(log)}}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-ctx{c[1]}x{c[2]}-{c[3]}{''.join(c[4])}")
def test_forecast_matches_llama_cpp(models, case):
    name, n_ctx, n_parallel, kv_type, flags, opts = case
    got = llama_buffers(models[name], n_ctx, n_parallel, kv_type, flags)
    assert got.pop("_seen") == set(BUFFERS), "llama.cpp's log no longer names every buffer: check the patterns"
    fc = forecast(read_meta(models[name]), n_ctx, n_parallel, kv_type, gpu_layers=0, **opts)
    want = {"weights": fc.weights_mb, "output": fc.output_mb, "kv": fc.kv_mb, "compute": fc.compute_mb}
    theirs, ours = sum(got.values()), sum(want.values())
    print(f"\n{name} ctx {n_ctx} x{n_parallel} {kv_type} {' '.join(flags)}: " + ", ".join(
        f"{k} {want[k]:.2f}/{got[k]:.2f}" for k in want) + f", total {ours:.2f}/{theirs:.2f} MiB (forecast/llama.cpp)")
    assert fc.cuda_context_mb == 0 and fc.gpu_mb == 0 and fc.total_mb == pytest.approx(ours)
    assert ours == pytest.approx(theirs, rel=0.10)
    # llama.cpp prints two decimals; weights and KV follow from the file and the shape exactly
    assert want["weights"] == pytest.approx(got["weights"], abs=0.01)
    assert want["kv"] == pytest.approx(got["kv"], abs=0.01)
    assert want["output"] == pytest.approx(got["output"], abs=0.01)
    assert want["compute"] == pytest.approx(got["compute"], rel=0.05, abs=0.02)


# ---- pure functions: no processes -------------------------------------------------------

def llama3_8b_q4(**kw) -> ModelMeta:
    """The shape of Llama-3-8B at Q4_K_M (GQA: 8 KV heads of 32), without the file."""
    layer = 138_412_032  # ~4.6 GiB over 32 layers + embeddings
    values = dict(path="/models/llama3-8b-q4.gguf", architecture="llama", name="llama3-8b", n_layer=32,
                  n_embd=4096, n_head=32, n_head_kv=(8,) * 32, head_dim_k=128, head_dim_v=128, n_ff=14336,
                  n_expert=0, n_expert_used=0, n_ff_expert=0, context_length=8192, n_vocab=128256,
                  weight_bytes_by_type={"Q4_K": 32 * layer, "Q6_K": 2 * 215_470_080},
                  weight_bytes=32 * layer + 2 * 215_470_080,
                  layer_bytes=(layer,) * 32, input_bytes=215_470_080, output_bytes=215_470_080 + 16384,
                  token_embd_bytes=215_470_080, tied_output=False, file_bytes=32 * layer + 2 * 215_470_080 + 8_000_000)
    values.update(kw)
    return ModelMeta(**values)


def test_kv_scales_linearly_with_context_and_shrinks_with_quantization():
    m = llama3_8b_q4()
    kv = {n: forecast(m, n, 1).kv_mb for n in (2048, 4096, 8192)}
    assert kv[4096] == 2 * kv[2048] and kv[8192] == 4 * kv[2048]
    assert kv[8192] == 1024  # 8192 x 32 layers x 8 heads x (128 + 128) x 2 bytes
    f16, q8, q4 = (forecast(m, 8192, 1, t).kv_mb for t in ("f16", "q8_0", "q4_0"))
    assert q4 < q8 < f16 and q8 == pytest.approx(f16 * 34 / 64)


def test_kv_padding_per_slot():
    m = llama3_8b_q4()
    fc = forecast(m, 1000, 3)
    assert (fc.n_ctx_seq, fc.kv_cells) == (512, 1536)
    assert forecast(m, 256, 4).kv_cells == 4 * KV_PAD  # every slot gets at least 256 cells
    assert forecast(m, 1000, 3, kv_unified=True).kv_cells == 1024


def test_gpu_placement_follows_llama_cpp_layers():
    m = llama3_8b_q4()
    cpu = forecast(m, 8192, 1, gpu_layers=0)
    assert cpu.gpu_mb == 0 and cpu.cuda_context_mb == 0 and fits(cpu, 0)[0]
    half = forecast(m, 8192, 1, gpu_layers=16)
    assert half.gpu_weights_mb * 2**20 == 16 * m.layer_bytes[0] and half.gpu_kv_mb == half.kv_mb / 2
    full = forecast(m, 8192, 1, gpu_layers=999, cuda_context_mb=650)
    assert full.gpu_layers == 33 and full.gpu_kv_mb == full.kv_mb and full.cuda_context_mb == 650
    assert full.gpu_weights_mb * 2**20 == 32 * m.layer_bytes[0] + m.output_bytes  # token_embd stays on the CPU
    assert full.total_mb == pytest.approx(full.gpu_mb + full.host_mb)
    # embeddings on: llama.cpp reserves logits for a whole ubatch (512 x 128256 x 4 bytes = 250.5 MiB)
    assert forecast(m, 8192, 1, embeddings=True).gpu_compute_mb - full.gpu_compute_mb > 100


def test_best_fit_never_returns_what_does_not_fit():
    m = llama3_8b_q4()
    for free in (6_000, 7_000, 9_000, 12_000, 24_000, 80_000):
        for slots in ((1,), (1, 2, 4), (8,)):
            fit, why = best_fit(m, free, slots=slots, headroom_pct=5)
            if fit is None:
                assert "fits" in why or "exceed" in why
                continue
            n_ctx, n_par = fit
            assert n_par in slots and n_ctx % (KV_PAD * n_par) == 0
            assert fits(forecast(m, n_ctx, n_par), free, headroom_pct=5)[0], (free, slots, fit)
            per_slot = n_ctx // n_par
            if per_slot < m.context_length:  # maximal: one step more does not fit
                assert not fits(forecast(m, n_ctx + KV_PAD * n_par, n_par), free, headroom_pct=5)[0]
    assert best_fit(m, 80_000, slots=(1, 4))[0] == (4 * 8192, 4)  # capped at the training context


def test_impossible_inputs_say_why():
    m = llama3_8b_q4()
    fit, why = best_fit(m, 3_000)
    assert fit is None and "weights" in why and "exceed" in why
    fit, why = best_fit(m, 80_000, min_ctx_per_slot=16384)
    assert fit is None and "multiple of 256" in why
    assert best_fit(m, 80_000, kv_type="q3")[0] is None
    ok, why = fits(forecast(m, 8192, 1), 4_000)
    assert not ok and "MiB on the GPU" in why and "available" in why
    assert fits(forecast(m, 8192, 1), 0) == (False, "no GPU memory (total 0 MiB)")
    with pytest.raises(ValueError, match="at least 1"):
        forecast(m, 0, 1)
    with pytest.raises(ValueError, match="slots cannot share"):
        forecast(m, 2, 4)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        forecast(m, 4096, 1, "q3")
    with pytest.raises(ValueError, match="without flash attention"):
        forecast(m, 4096, 1, "q8_0", flash_attn=False)
    with pytest.raises(ValueError, match="do not divide the head dimension"):  # as llama.cpp says at load
        forecast(llama3_8b_q4(head_dim_k=80, head_dim_v=80), 4096, 1, "q4_0")


# ---- GGUF metadata ------------------------------------------------------------------------

def test_read_meta(models):
    spec = MODELS["e256-L4"]
    m = read_meta(models["e256-L4"])
    assert (m.architecture, m.n_layer, m.n_embd, m.n_head, m.n_ff, m.context_length) == (
        "llama", spec.n_layer, spec.n_embd, spec.n_head, spec.n_ff, spec.n_ctx)
    assert m.n_head_kv == (spec.n_head,) * spec.n_layer and m.head_dim_k == m.head_dim_v == 32
    assert m.n_vocab == 375 and not m.tied_output
    assert m.weight_bytes == m.weight_bytes_by_type["F32"] == sum(m.layer_bytes) + m.input_bytes + m.output_bytes
    assert m.layer_bytes[0] == 4 * (4 * 256 * 256 + 3 * 256 * 384 + 2 * 256)
    assert m.weight_bytes < m.file_bytes


def test_read_meta_refuses_what_is_not_a_usable_gguf(tmp_path):
    with pytest.raises(ModelMetaError, match="cannot read"):
        read_meta(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelMetaError, match="not a GGUF"):
        read_meta(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "partial.gguf"), "llama")
    w.add_embedding_length(64)
    w.add_context_length(512)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelMetaError, match="llama.block_count' missing"):
        read_meta(tmp_path / "partial.gguf")
