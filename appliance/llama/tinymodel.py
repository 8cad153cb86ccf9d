"""A small random-weight llama GGUF that the appliance writes for itself.

Why: the appliance must run (and its tests must exercise real llama.cpp) on a
fresh machine with no download and no GPU. The weights are random, but the file
is a real GGUF that llama.cpp loads through the same code path as a real model:
an SPM vocabulary with byte fallback, token types, a chat template.

The output layer is biased toward printable pieces so that generated text looks
like text instead of control bytes, and away from EOS so that a request for N
tokens usually gets N tokens.
"""
from __future__ import annotations

import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A ChatML-style template; llama.cpp renders it with its Jinja engine.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the patient was seen today with no acute distress blood pressure heart rate "
    "normal history of diabetes and hypertension denies chest pain fever cough "
    "plan follow up in two weeks labs ordered medication continued dose daily "
    "exam lungs clear abdomen soft non tender alert oriented assessment stable"
).split()

# token types as llama.cpp knows them (llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


@dataclass(frozen=True)
class TinySpec:
    """Shape of the generated model; the defaults load in milliseconds."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 2048
    seed: int = 1234


def _vocab() -> tuple[list[bytes], list[int], list[float]]:
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>", b"<|im_start|>", b"<|im_end|>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL, _CONTROL, _CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(_BYTE)
    pieces = ["\u2581" + w for w in _WORDS]
    pieces += ["\u2581" + c for c in string.ascii_lowercase]
    pieces += list(string.ascii_lowercase) + list(".,:;0123456789")
    pieces.append("\u2581")
    seen = set()
    for p in pieces:
        if p in seen:
            continue
        seen.add(p)
        tokens.append(p.encode())
        types.append(_NORMAL)
    # SPM merges by score: longer pieces win, so words tokenize as one piece.
    scores = [0.0 if t != _NORMAL else float(len(tok)) for tok, t in zip(tokens, types)]
    return tokens, types, scores


def _printable(tok: bytes, ttype: int) -> bool:
    if ttype == _NORMAL:
        return True
    if ttype == _BYTE:
        value = int(tok[3:5], 16)
        return 0x61 <= value <= 0x7A  # lowercase ascii letters only
    return False


def write_tiny_model(path: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Write the model atomically (temp file + rename): several launchers may race."""
    import gguf  # imported here: only the launcher needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    tokens, types, scores = _vocab()
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_head

    fd, tmp = tempfile.mkstemp(prefix=".tiny-", suffix=".gguf", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name("appliance-tiny")
        w.add_context_length(spec.n_ctx)
        w.add_embedding_length(spec.n_embd)
        w.add_block_count(spec.n_layer)
        w.add_feed_forward_length(spec.n_ff)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)

        def t(name: str, *shape: int, scale: float = 0.02) -> None:
            w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

        # Dimension 0 of every embedding carries a large constant, so the final
        # hidden state has a stable component the output layer can key on.
        embd = (rng.standard_normal((n_vocab, spec.n_embd)) * 0.02).astype(np.float32)
        embd[:, 0] = 1.0
        w.add_tensor("token_embd.weight", embd)
        w.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        out = (rng.standard_normal((n_vocab, spec.n_embd)) * 0.5).astype(np.float32)
        for i, (tok, ttype) in enumerate(zip(tokens, types)):
            out[i, 0] = 2.0 if _printable(tok, ttype) else -8.0
        w.add_tensor("output.weight", out)
        for b in range(spec.n_layer):
            w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
            w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                t(f"blk.{b}.{name}.weight", spec.n_embd, spec.n_embd)
            t(f"blk.{b}.ffn_gate.weight", spec.n_ff, spec.n_embd)
            t(f"blk.{b}.ffn_up.weight", spec.n_ff, spec.n_embd)
            t(f"blk.{b}.ffn_down.weight", spec.n_embd, spec.n_ff)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ensure_tiny_model(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        write_tiny_model(path)
    return path
