"""What the memory planner needs to know about a GGUF model, read from its header.

Why: llama.cpp's memory use is a function of the model's shape (layers, widths, heads,
vocabulary) and of its tensors' byte sizes, all of which the GGUF header states. The
`gguf` package memory-maps the file and parses only the header and the tensor table,
so reading the metadata of a many-GiB model touches a few MiB and loads no weights.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec


class ModelMetaError(ValueError):
    """The file is missing, is not a GGUF, or lacks a key the planner needs."""


class ModelMeta(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    architecture: str
    name: str
    n_layer: int                     # block_count
    n_embd: int
    n_head: int                      # the largest, where a model gives one per layer
    n_head_kv: tuple[int, ...]       # per layer (GQA; some models vary it by layer)
    head_dim_k: int                  # key_length, else n_embd / n_head
    head_dim_v: int                  # value_length, else n_embd / n_head
    n_ff: int                        # feed_forward_length (the largest); 0 when absent
    n_expert: int                    # 0: a dense model
    n_expert_used: int
    n_ff_expert: int                 # expert_feed_forward_length; 0 when absent
    context_length: int              # the training context
    n_vocab: int
    weight_bytes_by_type: dict[str, int]  # GGML type name -> sum of tensor nbytes
    weight_bytes: int
    layer_bytes: tuple[int, ...]     # weights of blk.N.*, per layer
    input_bytes: int                 # token_embd and the rest outside blocks/output: stays on the CPU
    output_bytes: int                # output(.weight) + output_norm: the "output layer" llama.cpp offloads last
    token_embd_bytes: int
    tied_output: bool                # no output.weight: a GPU gets its own copy of token_embd as the output
    file_bytes: int


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception as exc:  # a malformed field: say which
        raise ModelMetaError(f"key {key!r} cannot be read: {exc}") from None


def _ints(value, n_layer: int, key: str) -> tuple[int, ...]:
    """A per-model or per-layer integer as one value per layer."""
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelMetaError(f"key {key!r} has {len(value)} values for {n_layer} layers")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layer


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """Shape and weight sizes of a GGUF; ModelMetaError names what is wrong."""
    import gguf  # a declared dependency, imported here: only the planner's callers need it

    path = Path(path)
    try:
        file_bytes = path.stat().st_size
    except OSError as exc:
        raise ModelMetaError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises ValueError, struct errors, IndexError...
        raise ModelMetaError(f"{path}: not a GGUF file ({exc})") from None

    arch = _value(reader, "general.architecture")
    if not arch:
        raise ModelMetaError(f"{path}: key 'general.architecture' missing")

    def need(key: str):
        value = _value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelMetaError(f"{path}: key '{arch}.{key}' missing")
        return value

    def opt(key: str, default):
        value = _value(reader, f"{arch}.{key}")
        return default if value is None else value

    n_layer = int(need("block_count"))
    n_embd = int(need("embedding_length"))
    n_ctx_train = int(need("context_length"))
    heads = _ints(need("attention.head_count"), n_layer, "attention.head_count")
    n_head = max(heads) if heads else 0
    if n_layer < 1 or n_embd < 1 or n_head < 1:
        raise ModelMetaError(f"{path}: impossible shape: {n_layer} layers, n_embd {n_embd}, {n_head} heads")
    kv_heads = _ints(opt("attention.head_count_kv", heads if len(set(heads)) > 1 else n_head),
                     n_layer, "attention.head_count_kv")
    head_k = int(opt("attention.key_length", n_embd // n_head))
    head_v = int(opt("attention.value_length", n_embd // n_head))
    ff = opt("feed_forward_length", 0)
    n_ff = max(int(v) for v in ff) if isinstance(ff, list) else int(ff)

    by_type: dict[str, int] = {}
    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = 0
    names = set()
    embd_bytes = 0
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        names.add(t.name)
        tname = t.tensor_type.name
        by_type[tname] = by_type.get(tname, 0) + nbytes
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += nbytes
        elif t.name.startswith("output"):
            output_bytes += nbytes
        else:
            input_bytes += nbytes
        if t.name == "token_embd.weight":
            embd_bytes = nbytes
    if not names:
        raise ModelMetaError(f"{path}: the GGUF holds no tensors")
    tied = "output.weight" not in names

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        n_vocab = len(tokens.data)
    else:
        n_vocab = int(opt("vocab_size", 0))
    if n_vocab < 1:
        raise ModelMetaError(f"{path}: no vocabulary ('tokenizer.ggml.tokens' or '{arch}.vocab_size')")

    return ModelMeta(
        path=str(path), architecture=str(arch), name=str(_value(reader, "general.name") or path.stem),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=kv_heads,
        head_dim_k=head_k, head_dim_v=head_v, n_ff=n_ff,
        n_expert=int(opt("expert_count", 0)), n_expert_used=int(opt("expert_used_count", 0)),
        n_ff_expert=int(opt("expert_feed_forward_length", 0)),
        context_length=n_ctx_train, n_vocab=n_vocab,
        weight_bytes_by_type=by_type, weight_bytes=sum(by_type.values()),
        layer_bytes=tuple(layer_bytes), input_bytes=input_bytes, output_bytes=output_bytes,
        token_embd_bytes=embd_bytes, tied_output=tied, file_bytes=file_bytes,
    )
