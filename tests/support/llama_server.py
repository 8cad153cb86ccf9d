"""A `llama-server` command line over the xllamacpp wheel: llama.cpp's own server in a
process of its own.

Why: the launcher's external-binary mode (a CUDA `llama-server` on a GPU box) must be
tested, and killing llama.cpp without its launcher must be possible, on a machine
with no llama.cpp build. This takes the arguments the launcher passes
(appliance/llama/server.py, ExternalServer) and the key from LLAMA_API_KEY, and runs
the same llama.cpp server the embedded mode runs, until SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal

import xllamacpp as xlc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--alias", default="model")
    ap.add_argument("--slots", action="store_true")
    ap.add_argument("--metrics", action="store_true")
    ap.add_argument("--embeddings", action="store_true")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--cache-ram", type=int, default=8192)
    # llama-server's own names, for the memory planner's checks (tests/test_planner.py)
    ap.add_argument("-lv", "--verbosity", "--log-verbosity", type=int, default=None)  # 4: buffer sizes
    ap.add_argument("-ctk", "--cache-type-k", default="f16")
    ap.add_argument("-ctv", "--cache-type-v", default="f16")
    ap.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), default="auto")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-kvu", "--kv-unified", action="store_true")
    a = ap.parse_args()
    p = xlc.CommonParams()
    p.model.path = a.model
    p.hostnames = [a.host]
    p.port = a.port
    p.n_ctx = a.ctx_size
    p.n_parallel = a.parallel
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    p.n_threads_http = max(2, a.parallel + 1)
    p.n_gpu_layers = a.n_gpu_layers
    p.embedding = a.embeddings
    p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    p.endpoint_slots = a.slots
    p.endpoint_metrics = a.metrics
    p.model_alias = {a.alias}
    p.warmup = False
    p.cache_ram_mib = a.cache_ram
    if a.verbosity is not None:
        p.verbosity = a.verbosity
    p.cache_type_k = getattr(xlc.ggml_type, "GGML_TYPE_" + a.cache_type_k.upper())
    p.cache_type_v = getattr(xlc.ggml_type, "GGML_TYPE_" + a.cache_type_v.upper())
    p.flash_attn_type = getattr(xlc.llama_flash_attn_type, "LLAMA_FLASH_ATTN_TYPE_" + {
        "on": "ENABLED", "off": "DISABLED", "auto": "AUTO"}[a.flash_attn])
    p.n_ubatch = a.ubatch_size
    p.n_batch = max(p.n_batch, a.ubatch_size)
    p.kv_unified = a.kv_unified
    if os.environ.get("LLAMA_API_KEY"):
        p.api_keys = [os.environ["LLAMA_API_KEY"]]
    server = xlc.Server(p)  # serves on its own threads
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while server is not None:
        signal.pause()


if __name__ == "__main__":
    main()
