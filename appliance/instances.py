"""The model instances: which llama.cpp servers run, with what, where.

Read from INSTANCES_FILE (TOML; default `instances.toml` in the appliance home) into
msgspec types at start; an error names the key and the reason and stops start-up. A
site with one model writes nothing: without the file the appliance runs
LLAMA_INSTANCES instances of MODEL_PATH (or of the generated tiny model), every
per-instance value defaulting to the global settings (LLAMA_SLOTS, LLAMA_CTX, ...).

    [[instance]]
    name = "llama-0"                 # lowercase letters, digits, dashes; unique
    model = "/models/med-8b-q4.gguf" # a GGUF path; absent: the generated tiny model
    alias = "med-8b"                 # the model id clients ask for; default: file stem
    slots = 4                        # parallel requests in llama.cpp
    reserved_slots = 1               # of those, only critical/high work may take them
    ctx = 16384                      # total context, split across the slots
    threads = 8
    gpu = 0                          # pin to this GPU (CUDA_VISIBLE_DEVICES); absent: CPU only
    gpu_layers = 999
    engine = "external"              # "embedded" (the xllamacpp wheel) or "external"
    server_bin = "/usr/local/bin/llama-server"
    extra_args = ["--flash-attn", "on"]
    embeddings = true
    port = 8080                      # preferred; a free port when it is taken (and the log says so)

Every process reads the same file: `appliance up` generates the supervisord programs
of the `llama` group from it, a launcher finds its own entry by name, the broker and
the API learn which models are configured.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .config import ConfigError, Settings

TINY_ALIAS = "appliance-tiny"
# The system description's three servers listened on these; used when they are free.
DEFAULT_PORTS = (8080, 8081, 8084)
RESERVED_NAMES = frozenset({"api", "broker", "gpumon", "rag", "llama", "supervisord"})

Name = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]


class InstanceEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One [[instance]] table as written; absent values come from the settings."""

    name: Name
    model: str | None = None
    alias: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    slots: Annotated[int, Meta(ge=1, le=256)] | None = None
    reserved_slots: Annotated[int, Meta(ge=0, le=255)] | None = None
    ctx: Annotated[int, Meta(ge=256)] | None = None
    threads: Annotated[int, Meta(ge=1, le=1024)] | None = None
    gpu: Annotated[int, Meta(ge=0, le=63)] | None = None
    gpu_layers: Annotated[int, Meta(ge=0)] | None = None
    engine: Literal["embedded", "external"] | None = None
    server_bin: str | None = None
    extra_args: list[str] = []
    embeddings: bool = True
    port: Annotated[int, Meta(ge=0, le=65535)] | None = None


class InstancesFile(msgspec.Struct, forbid_unknown_fields=True):
    instance: Annotated[list[InstanceEntry], Meta(min_length=1)]


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One instance with every value resolved."""

    name: str
    model_path: str        # the GGUF file
    tiny: bool             # the generated model (written at start when missing)
    alias: str             # the model id
    slots: int
    reserved_slots: int
    ctx: int
    threads: int
    gpu: int               # -1: CPU only
    gpu_layers: int
    engine: Literal["embedded", "external"]
    server_bin: str
    extra_args: tuple[str, ...]
    embeddings: bool
    port: int              # preferred port; 0: any free one


def instances_path(s: Settings) -> Path:
    return Path(s.instances_file) if s.instances_file else s.home / "instances.toml"


def _resolve(e: InstanceEntry, s: Settings, index: int) -> Instance:
    tiny = e.model is None and not s.model_path
    model_path = str(s.model_file) if e.model is None else str(Path(e.model).expanduser())
    if not tiny and not Path(model_path).is_absolute():
        model_path = str(s.home / model_path)
    alias = e.alias or (s.model_alias if e.model is None and s.model_alias else None) \
        or (TINY_ALIAS if tiny else Path(model_path).stem)
    slots = e.slots or s.llama_slots
    reserved = e.reserved_slots if e.reserved_slots is not None else (1 if slots >= 2 else 0)
    if reserved >= slots:
        raise ConfigError(f"instance {e.name!r}: reserved_slots ({reserved}) must be fewer than slots ({slots})")
    server_bin = e.server_bin if e.server_bin is not None else s.llama_server_bin
    engine = e.engine or ("external" if server_bin else "embedded")
    if engine == "external" and not server_bin:
        raise ConfigError(f"instance {e.name!r}: engine = \"external\" needs server_bin (or LLAMA_SERVER_BIN)")
    if e.port is not None:
        port = e.port
    elif s.llama_port_base:
        port = s.llama_port_base + index
    else:
        port = DEFAULT_PORTS[index] if index < len(DEFAULT_PORTS) else 0
    return Instance(name=e.name, model_path=model_path, tiny=tiny, alias=alias, slots=slots,
                    reserved_slots=reserved, ctx=e.ctx or s.llama_ctx, threads=e.threads or s.llama_threads,
                    gpu=-1 if e.gpu is None else e.gpu,
                    gpu_layers=e.gpu_layers if e.gpu_layers is not None else s.llama_gpu_layers,
                    engine=engine, server_bin=server_bin, extra_args=tuple(e.extra_args),
                    embeddings=e.embeddings, port=port)


def parse(text: str, s: Settings, source: str = "instances file") -> list[Instance]:
    """The instances a TOML text describes; ConfigError names the key and the reason."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        entries = msgspec.convert(raw, InstancesFile).instance
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {str(exc).replace('`$.', '`')}") from None
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ConfigError(f"{source}: instance name {e.name!r} is used twice")
        if e.name in RESERVED_NAMES:
            raise ConfigError(f"{source}: instance name {e.name!r} is taken by another program")
        seen.add(e.name)
    instances = [_resolve(e, s, i) for i, e in enumerate(entries)]
    by_alias: dict[str, str] = {}
    for inst in instances:  # one model id, one file: a result's provenance must be unambiguous
        if by_alias.setdefault(inst.alias, inst.model_path) != inst.model_path:
            raise ConfigError(f"{source}: model id {inst.alias!r} names two different files; give each an alias")
    return instances


def default_instances(s: Settings) -> list[Instance]:
    """Without a file: LLAMA_INSTANCES instances of the configured (or tiny) model."""
    return [_resolve(InstanceEntry(name=f"llama-{i}"), s, i) for i in range(s.llama_instances)]


def load(s: Settings) -> list[Instance]:
    path = instances_path(s)
    if not path.is_file():
        if s.instances_file:
            raise ConfigError(f"INSTANCES_FILE: {path} does not exist")
        return default_instances(s)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"INSTANCES_FILE: cannot read {path}: {exc.strerror}") from None
    return parse(text, s, str(path))


def find(instances: list[Instance], name: str) -> Instance:
    for inst in instances:
        if inst.name == name:
            return inst
    raise ConfigError(f"no instance named {name!r} in the instances file")


def check_files(instances: list[Instance]) -> None:
    """Refuse a configured GGUF or server binary that is not there (the tiny model is made)."""
    for inst in instances:
        if not inst.tiny and not Path(inst.model_path).is_file():
            raise ConfigError(f"instance {inst.name!r}: model {inst.model_path} does not exist")
        if inst.engine == "external" and not Path(inst.server_bin).is_file():
            raise ConfigError(f"instance {inst.name!r}: server_bin {inst.server_bin} does not exist")


def models(instances: list[Instance]) -> list[str]:
    """The configured model ids, in the file's order (the first is the default)."""
    return list(dict.fromkeys(inst.alias for inst in instances))
