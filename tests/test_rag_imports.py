"""Import order of onnxruntime and usearch, in fresh interpreters.

usearch >= 2.26.2 imported before onnxruntime >= 1.24 kills the process with SIGSEGV
(../shared/FIELD-NOTES.md); appliance/rag/__init__.py imports onnxruntime first so that
no module of the package can load usearch before it. A crash cannot be caught in-process,
hence one subprocess per check.
"""
from __future__ import annotations

import pkgutil
import signal
import subprocess
import sys
import textwrap

import appliance.rag

EMBED_AND_INDEX = """
    from usearch.index import Index
    from appliance.rag.embedder import load
    e = load("minilm")
    v = e.embed(["acute myocardial infarction", "fractured femur"])
    idx = Index(ndim=e.dim, metric="cos")
    idx.add([1, 2], v)
    hit = idx.search(e.embed(["heart attack"])[0], 1)
    assert int(hit.keys[0]) == 1, hit.keys
    print("ok")
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_the_pitfall_exists_with_the_pinned_versions():
    """Documents why the order matters: usearch first crashes the interpreter. If this
    fails because the child now survives, the pinned versions have lost the bug: the rule
    in appliance/rag/__init__.py (and the field note) can be revisited."""
    got = run("import usearch\nimport onnxruntime\n" + textwrap.dedent(EMBED_AND_INDEX))
    assert got.returncode == -signal.SIGSEGV, (
        f"usearch before onnxruntime no longer segfaults (rc {got.returncode}): {got.stderr[-500:]}")


def test_the_appliance_import_path_embeds_and_indexes():
    got = run("import appliance.rag.embedder\nimport usearch\n" + textwrap.dedent(EMBED_AND_INDEX))
    assert got.returncode == 0 and got.stdout.strip() == "ok", (got.returncode, got.stderr[-2000:])


def test_no_rag_module_loads_usearch_before_onnxruntime():
    """Each module of appliance.rag imported first in its own interpreter (whatever order a
    worker uses, one of them comes first), then usearch and onnxruntime, and used: a
    module or an __init__ that pulls usearch in ahead of onnxruntime fails here, by name."""
    modules = sorted(m.name for m in pkgutil.iter_modules(appliance.rag.__path__, "appliance.rag."))
    assert "appliance.rag.embedder" in modules
    probe = """
        import sys
        seen = []
        class Recorder:
            def find_spec(self, name, path=None, target=None):
                if name in ("usearch", "onnxruntime") and name not in seen:
                    seen.append(name)
        sys.meta_path.insert(0, Recorder())
        import importlib
        importlib.import_module(sys.argv[1])
        import usearch.index, onnxruntime
        assert seen[0] == "onnxruntime", f"{sys.argv[1]} loads {seen[0]} first ({seen})"
        idx = usearch.index.Index(ndim=4, metric="cos")
        idx.add(1, __import__("numpy").ones(4, dtype="float32"))
        assert len(idx) == 1
    """
    procs = {m: subprocess.Popen([sys.executable, "-c", textwrap.dedent(probe), m], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in modules}
    failed = {}
    for m, p in procs.items():
        out, err = p.communicate(timeout=60)
        if p.returncode != 0:
            failed[m] = ("SIGSEGV: usearch loaded before onnxruntime" if p.returncode == -signal.SIGSEGV
                         else (p.returncode, err.strip().splitlines()[-1:]))
    assert not failed, failed
