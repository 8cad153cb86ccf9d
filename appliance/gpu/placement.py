"""Where each instance should run: a pure placement rule, and its edit of the instances file.

Why first-fit decreasing by GPU memory: the largest instances are the hardest to
place, so they choose first; each stays where it is when it fits there (a move costs
a restart), else goes to the GPU with the most room left. An instance that fits nowhere stays on the
CPU, with the reason. The rule only proposes: POST /v1/gpu/rebalance shows the plan,
and with `apply` (admin) the instances file gets the new `gpu` values and the changed
instances restart through supervisord (`appliance reload`'s path).
"""
from __future__ import annotations

import re

import msgspec


class Want(msgspec.Struct, frozen=True):
    """An instance, as the rule sees it."""

    name: str
    gpu: int          # where it is now; -1: CPU
    gpu_mb: float     # what it needs on a GPU (memory forecast); 0: runs on the CPU by choice


class Room(msgspec.Struct, frozen=True):
    index: int
    total_mb: float
    others_mb: float = 0.0  # held by processes that are not appliance instances


class Placed(msgspec.Struct, frozen=True):
    name: str
    gpu: int          # -1: CPU
    was: int
    reason: str

    @property
    def moves(self) -> bool:
        return self.gpu != self.was


def plan(wants: list[Want], rooms: list[Room], headroom_pct: float = 10.0) -> list[Placed]:
    free = {r.index: r.total_mb * (1 - headroom_pct / 100) - r.others_mb for r in rooms}
    placed: dict[str, Placed] = {}
    for w in sorted(wants, key=lambda w: (-w.gpu_mb, w.name)):
        if w.gpu_mb <= 0:
            placed[w.name] = Placed(w.name, -1, w.gpu, "runs on the CPU (gpu_layers = 0)")
            continue
        if not free:
            placed[w.name] = Placed(w.name, -1, w.gpu, "no GPU seen")
            continue
        best = max(free, key=lambda i: (free[i], i == w.gpu, -i))
        if free[best] < w.gpu_mb:
            placed[w.name] = Placed(w.name, -1, w.gpu, f"needs {w.gpu_mb:.0f} MiB; the roomiest GPU {best} has "
                                                        f"{free[best]:.0f} MiB left")
            continue
        if w.gpu in free and free[w.gpu] >= w.gpu_mb:
            best = w.gpu  # it fits where it is: staying costs no restart
        free[best] -= w.gpu_mb
        placed[w.name] = Placed(w.name, best, w.gpu, f"{w.gpu_mb:.0f} MiB on GPU {best}; "
                                                     f"{free[best]:.0f} MiB left there")
    return [placed[w.name] for w in wants]


_HEADER = re.compile(r"^\s*\[\[\s*instance\s*\]\]\s*(#.*)?$")
_NAME = re.compile(r"""^\s*name\s*=\s*["']([^"']+)["']""")
_GPU = re.compile(r"^\s*gpu\s*=")


def set_gpus(text: str, gpus: dict[str, int]) -> str:
    """The instances file's text with each named instance's `gpu` set (-1: the line
    removed, i.e. CPU only). Everything else, comments included, is left as written."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _HEADER.match(line)] + [len(lines)]
    out = lines[:starts[0]]
    for a, b in zip(starts, starts[1:]):
        block = lines[a:b]
        name = next((m.group(1) for line in block if (m := _NAME.match(line))), None)
        if name in gpus:
            block = [line for line in block if not _GPU.match(line)]
            if gpus[name] >= 0:
                at = next(i for i, line in enumerate(block) if _NAME.match(line)) + 1
                block.insert(at, f"gpu = {gpus[name]}\n")
        out += block
    return "".join(out)
