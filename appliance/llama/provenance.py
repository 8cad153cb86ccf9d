"""What a model file is, for the provenance every result carries: its SHA-256 and
quantization type.

Hashing a multi-gigabyte GGUF takes seconds to minutes, so it is done once per file:
the digest is cached by path, size and modification time (a JSON file in DATA_DIR),
and recomputed only when the file changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import gguf

log = logging.getLogger("appliance.llama")

CACHE_NAME = "model-hashes.json"


def sha256_of(path: Path, cache_dir: Path) -> str:
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = cache_dir / CACHE_NAME
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = {"stamp": stamp, "sha256": digest}
    tmp = cache_file.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
    try:  # several launchers may write at once: each writes whole, the last one wins
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.warning("model hash cache not written: %s", exc.strerror)
    return digest


def quantization_of(path: Path) -> str:
    """The GGUF's declared file type (MOSTLY_Q4_K_M -> Q4_K_M), else its commonest tensor type."""
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None and field.data:
        try:
            name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, IndexError):
            pass
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    return kinds.most_common(1)[0][0] if kinds else "unknown"
