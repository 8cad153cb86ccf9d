"""How much memory a llama.cpp instance will take, before starting it: pure functions.

Why: a llama.cpp server that does not fit its GPU fails at load (or, with partial
offload, runs slowly), and the appliance should say so, or choose a context and a
slot count that fit, before it starts one. Every figure below reproduces a buffer that
llama.cpp itself logs at load (verbosity 4), measured on the xllamacpp build this
project ships (tests/test_planner.py checks them against real loads):

- weights: the tensors' bytes as the GGUF states them ("model buffer size").
- KV cache ("KV buffer size"): cells x layers x n_head_kv x (head_dim_k + head_dim_v) x
  bytes of the cache type. Each slot gets ceil(n_ctx / n_parallel) cells rounded UP to a
  multiple of 256 (kv_unified false, the server's default): n_ctx 1000 over 3 slots
  takes 3 x 512 cells, 256 over 4 slots takes 4 x 256. One stream of pad256(n_ctx)
  cells with kv_unified.
- output buffer: n_parallel x (n_vocab [+ n_embd with embeddings]) x 4 bytes, on the host.
- compute buffer ("compute buffer size"): see compute_bytes.
- CUDA context: per process, not logged by llama.cpp; measured ~650 MiB on an H200
  (nvidia-smi with no layers offloaded), a setting here.
Only the CPU side is validated; the split between GPU and host for offloaded layers
follows llama.cpp's placement rules (the last gpu_layers blocks, then the output layer;
token_embd stays on the CPU) and is not checked against a GPU in the tests.
"""
from __future__ import annotations

import math

import msgspec

from .gguf_meta import ModelMeta

MiB = 1024 * 1024
KV_PAD = 256  # llama.cpp pads each KV stream to this many cells
# bytes per element of the KV cache types llama-server accepts (block types: bytes/32)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32,
                 "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    """MiB throughout. total_mb = host_mb + gpu_mb = weights + KV + compute + output + CUDA context."""

    n_ctx: int                # as asked
    n_parallel: int
    n_ctx_seq: int            # KV cells per slot after llama.cpp's padding
    kv_cells: int             # all slots
    kv_type: str
    flash_attn: bool
    gpu_layers: int           # effective: 0..n_layer+1 (n_layer+1 includes the output layer)
    weights_mb: float
    kv_mb: float
    compute_mb: float         # host and GPU compute buffers together
    output_mb: float
    cuda_context_mb: float
    gpu_weights_mb: float
    gpu_kv_mb: float
    gpu_compute_mb: float
    gpu_mb: float             # what the GPU must hold, CUDA context included
    host_mb: float            # what stays in RAM (weights there are memory-mapped)
    total_mb: float


def kv_layout(n_ctx: int, n_parallel: int, kv_unified: bool = False) -> tuple[int, int]:
    """(streams, cells per stream) as llama.cpp allocates them."""
    if kv_unified:
        return 1, _pad(n_ctx)
    return n_parallel, _pad(math.ceil(n_ctx / n_parallel))


def _pad(n: int) -> int:
    return max(KV_PAD, -(-n // KV_PAD) * KV_PAD)


def kv_bytes_per_cell(meta: ModelMeta, kv_type: str = "f16") -> tuple[float, ...]:
    """Bytes one KV cell takes in each layer (K and V)."""
    size = KV_TYPE_BYTES[kv_type]
    return tuple(h * (meta.head_dim_k + meta.head_dim_v) * size for h in meta.n_head_kv)


def compute_bytes(meta: ModelMeta, n_ctx: int, n_parallel: int, *, n_ubatch: int = 512,
                  n_batch: int = 2048, flash_attn: bool = True, embeddings: bool = False,
                  kv_unified: bool = False, kv_type: str = "f16") -> int:
    """The compute buffer llama.cpp reserves for its worst-case graph (one ubatch).

    Derived from about 100 CPU loads of generated llama models (n_embd 64..1024, n_ff
    64..2048, n_layer 2..8, vocab 375..32768, n_ctx 100..8192, 1..8 slots, ubatch
    256..1024, each KV type), fitted to the sizes llama.cpp logs. Every part scales
    with the ubatch ub = min(n_ubatch, n_batch, n_ctx): doubling ub doubles the buffer.
    Per token of the ubatch, with flash attention (llama.cpp's `auto` picks it on CPU and
    on current GPUs):
      2 x n_kv        the f16 attention mask over one stream's cells (exactly 1 MiB per
                      1024 cells at ub 512; it shrinks as slots grow, unless kv_unified)
      20 x n_embd     five f32 activations of width n_embd alive at the peak
      4 x n_embd      more with an f32 KV cache
      48              token ids, positions and small inputs
    plus the larger of two phases: the feed-forward, 12 x max(n_ff, n_embd) (three f32
    tensors: gate, up, their product), and the logits, n_outputs x n_vocab x 4 bytes in
    all, where n_outputs is the whole ubatch with embeddings on (mean pooling needs every
    token) and one per slot otherwise. Without flash attention the mask is f32 (4 x n_kv)
    and an attention phase, n_head x n_kv x 4 (the KQ scores) + 12 x n_embd, competes.
    The allocator sometimes packs tighter (8 x n_ff when n_ff == n_embd, or with only 2
    layers up to n_ff == 2 x n_embd; 28..32 x n_embd in all when n_ff < n_embd): the
    formula takes the upper case, so it errs high by at most 4 x max(n_ff, n_embd) per
    token on those shapes and is within 0.03 MiB elsewhere. Mixture-of-experts models are approximated
    by n_expert_used x expert_feed_forward_length (not measured).
    """
    ub = max(1, min(n_ubatch, n_batch, n_ctx))
    _, n_kv = kv_layout(n_ctx, n_parallel, kv_unified)
    e = meta.n_embd
    f = meta.n_ff or 4 * e
    if meta.n_expert and meta.n_ff_expert:
        f = max(meta.n_ff, meta.n_ff_expert * max(1, meta.n_expert_used))
    ffn = 12 * max(f, e)
    logits = (ub if embeddings else n_parallel) * meta.n_vocab * 4
    acts = (24 if kv_type == "f32" else 20) * e + 48
    if flash_attn:
        return ub * (2 * n_kv + acts) + max(ub * ffn, logits)
    attn = meta.n_head * n_kv * 4 + 12 * e
    return ub * (4 * n_kv + acts) + max(ub * attn, ub * ffn, logits)


def forecast(meta: ModelMeta, n_ctx: int, n_parallel: int = 1, kv_type: str = "f16", *,
             gpu_layers: int = 999, cuda_context_mb: float = 650.0, n_ubatch: int = 512,
             n_batch: int = 2048, flash_attn: bool = True, embeddings: bool = False,
             kv_unified: bool = False) -> Forecast:
    """What an instance of `meta` with these settings will take; ValueError for impossible ones.

    gpu_layers follows llama.cpp's -ngl: the last gpu_layers blocks go to the GPU, and
    the output layer too when gpu_layers > n_layer (999: everything). The CUDA context is
    counted only when something is offloaded. embeddings: the appliance's instances
    serve embeddings by default, which makes llama.cpp reserve logits for a whole ubatch.
    """
    if n_ctx < 1 or n_parallel < 1:
        raise ValueError(f"n_ctx ({n_ctx}) and n_parallel ({n_parallel}) must be at least 1")
    if n_parallel > n_ctx:
        raise ValueError(f"{n_parallel} slots cannot share {n_ctx} tokens of context")
    if kv_type not in KV_TYPE_BYTES:
        raise ValueError(f"unknown KV cache type {kv_type!r}; one of {', '.join(KV_TYPE_BYTES)}")
    if not flash_attn and kv_type not in ("f32", "f16", "bf16"):
        raise ValueError(f"llama.cpp refuses a quantized V cache ({kv_type}) without flash attention")
    if KV_TYPE_BYTES[kv_type] < 2 and (meta.head_dim_k % 32 or meta.head_dim_v % 32):
        raise ValueError(f"llama.cpp refuses a {kv_type} cache: its blocks of 32 do not divide the head "
                         f"dimension ({meta.head_dim_k}/{meta.head_dim_v})")
    if gpu_layers < 0 or n_ubatch < 1 or n_batch < 1 or cuda_context_mb < 0:
        raise ValueError("gpu_layers, cuda_context_mb must be >= 0 and n_ubatch, n_batch >= 1")

    L = meta.n_layer
    ngl = min(gpu_layers, L + 1)
    first_gpu = L - min(ngl, L)
    output_on_gpu = ngl > L
    streams, cells = kv_layout(n_ctx, n_parallel, kv_unified)
    per_cell = kv_bytes_per_cell(meta, kv_type)
    kv_cells = streams * cells
    kv_gpu = sum(per_cell[first_gpu:]) * kv_cells
    kv_all = sum(per_cell) * kv_cells

    w_gpu = sum(meta.layer_bytes[first_gpu:])
    if output_on_gpu:  # a tied output gets its own copy of token_embd on the GPU
        w_gpu += meta.output_bytes + (meta.token_embd_bytes if meta.tied_output else 0)
    w_host = meta.input_bytes + sum(meta.layer_bytes[:first_gpu]) + (0 if output_on_gpu else meta.output_bytes)

    comp = compute_bytes(meta, n_ctx, n_parallel, n_ubatch=n_ubatch, n_batch=n_batch,
                         flash_attn=flash_attn, embeddings=embeddings, kv_unified=kv_unified,
                         kv_type=kv_type)
    if ngl == 0:
        comp_gpu, comp_host = 0, comp
    elif output_on_gpu:  # all on the GPU: the host only gathers the input rows
        comp_gpu, comp_host = comp, min(n_ubatch, n_batch, n_ctx) * meta.n_embd * 4
    else:  # layers on both sides: each backend reserves the worst case (conservative)
        comp_gpu, comp_host = comp, comp
    out = n_parallel * (meta.n_vocab + (meta.n_embd if embeddings else 0)) * 4
    ctx_mb = float(cuda_context_mb) if ngl > 0 else 0.0

    gpu_mb = (w_gpu + kv_gpu + comp_gpu) / MiB + ctx_mb
    host_mb = (w_host + (kv_all - kv_gpu) + comp_host + out) / MiB
    return Forecast(
        n_ctx=n_ctx, n_parallel=n_parallel, n_ctx_seq=cells, kv_cells=kv_cells, kv_type=kv_type,
        flash_attn=flash_attn, gpu_layers=ngl,
        weights_mb=(w_gpu + w_host) / MiB, kv_mb=kv_all / MiB, compute_mb=(comp_gpu + comp_host) / MiB,
        output_mb=out / MiB, cuda_context_mb=ctx_mb,
        gpu_weights_mb=w_gpu / MiB, gpu_kv_mb=kv_gpu / MiB, gpu_compute_mb=comp_gpu / MiB,
        gpu_mb=gpu_mb, host_mb=host_mb, total_mb=gpu_mb + host_mb,
    )


def fits(fc: Forecast, gpu_total_mb: float, gpu_used_mb: float = 0.0,
         headroom_pct: float = 10.0) -> tuple[bool, str]:
    """Whether the forecast's GPU part fits, keeping headroom_pct of the GPU free; and why.

    The headroom covers what the forecast does not see: fragmentation, CUDA's own
    workspaces (cuBLAS), other processes growing.
    """
    if fc.gpu_mb <= 0:
        return True, "nothing is offloaded to the GPU"
    if gpu_total_mb <= 0:
        return False, f"no GPU memory (total {gpu_total_mb:g} MiB)"
    if not 0 <= headroom_pct < 100:
        return False, f"headroom_pct must be in [0, 100), not {headroom_pct:g}"
    budget = gpu_total_mb * (1 - headroom_pct / 100) - max(0.0, gpu_used_mb)
    need = (f"{fc.gpu_mb:.0f} MiB on the GPU (weights {fc.gpu_weights_mb:.0f} + KV {fc.gpu_kv_mb:.0f}"
            f" + compute {fc.gpu_compute_mb:.0f} + CUDA context {fc.cuda_context_mb:.0f})")
    have = (f"{budget:.0f} MiB available ({gpu_total_mb:.0f} total - {gpu_used_mb:.0f} used"
            f" - {headroom_pct:g}% headroom)")
    if fc.gpu_mb <= budget:
        return True, f"needs {need}; {have}"
    return False, f"needs {need} but only {have}"


def best_fit(meta: ModelMeta, gpu_free_mb: float, *, gpu_total_mb: float | None = None,
             slots: tuple[int, ...] = (1,), min_ctx_per_slot: int = KV_PAD,
             max_ctx_per_slot: int | None = None, headroom_pct: float = 10.0,
             **forecast_kw) -> tuple[tuple[int, int] | None, str]:
    """The (n_ctx, n_parallel) with the largest total context that fits, or None and why.

    Each candidate slot count gets the largest per-slot context that fits, in multiples
    of 256 (llama.cpp pads every slot to 256 cells, so anything between is paid for but
    unusable), at most max_ctx_per_slot (default: the model's training context, beyond
    which it was not trained); ties go to more slots. Memory grows monotonically with the
    context, so a binary search per slot count is exact with respect to the forecast.
    """
    total = gpu_free_mb if gpu_total_mb is None else gpu_total_mb
    used = max(0.0, total - gpu_free_mb)
    cap = (max_ctx_per_slot or meta.context_length) // KV_PAD
    low = max(1, -(-min_ctx_per_slot // KV_PAD))
    if cap < low:
        return None, (f"no per-slot context between {min_ctx_per_slot} and "
                      f"{max_ctx_per_slot or meta.context_length} is a multiple of {KV_PAD}")
    if not slots or min(slots) < 1:
        return None, f"slot counts must be at least 1, not {slots!r}"

    def ok(n: int, k: int) -> tuple[bool, str]:
        return fits(forecast(meta, k * KV_PAD * n, n, **forecast_kw), total, used, headroom_pct)

    try:
        smallest = forecast(meta, low * KV_PAD, 1, **forecast_kw)
    except ValueError as exc:
        return None, str(exc)
    budget = total * (1 - headroom_pct / 100) - used
    fixed = smallest.gpu_weights_mb + smallest.cuda_context_mb
    if smallest.gpu_mb > 0 and fixed > budget:
        return None, (f"the offloaded weights ({smallest.gpu_weights_mb:.0f} MiB) and the CUDA context "
                      f"({smallest.cuda_context_mb:.0f} MiB) alone exceed the {budget:.0f} MiB available: "
                      f"offload fewer layers or use a smaller quantization")

    best: tuple[int, int] | None = None
    why = ""
    for n in sorted(set(slots)):
        good, reason = ok(n, low)
        if not good:
            why = why or f"{n} slot(s) x {low * KV_PAD} tokens: {reason}"
            continue
        lo, hi = low, cap
        while lo < hi:  # largest k that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(n, mid)[0] else (lo, mid - 1)
        cand = (lo * KV_PAD * n, n)
        if best is None or cand >= best:
            best = cand
    if best is None:
        return None, f"nothing fits: {why}"
    fc = forecast(meta, best[0], best[1], **forecast_kw)
    return best, f"{best[1]} slot(s) x {best[0] // best[1]} tokens: {fits(fc, total, used, headroom_pct)[1]}"
