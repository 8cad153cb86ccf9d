"""The vector index: persistence, mismatch refusal, filtered search, compaction under load."""
import json
import threading
import time

import numpy as np
import pytest

from appliance.rag import vectors as vmod
from appliance.rag.vectors import IndexMismatch, VectorIndex

DIM = 32


def unit(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def vecs():
    return unit(600)


def brute(q, vecs, keys, k):
    sims = vecs[keys] @ (q / np.linalg.norm(q))
    order = sorted(range(len(keys)), key=lambda i: (-sims[i], keys[i]))[:k]
    return [keys[i] for i in order]


def test_add_search_contains_len(tmp_path, vecs):
    ix = VectorIndex(tmp_path / "v.usearch", DIM, "test:a")
    assert len(ix) == 0 and ix.search(vecs[0], 5) == [] and ix.deleted_fraction == 0.0
    ix.add(range(100), vecs[:100])
    assert len(ix) == 100 and ix.contains(5) and not ix.contains(100)
    hits = ix.search(vecs[7], 3)
    assert hits[0][0] == 7 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))
    ix.add([7], vecs[200:201])                       # replacing a key is an upsert
    assert len(ix) == 100 and ix.search(vecs[200], 1)[0][0] == 7


def test_persistence_across_reopen(tmp_path, vecs):
    p = tmp_path / "v.usearch"
    ix = VectorIndex(p, DIM, "test:a")
    ix.add(range(50), vecs[:50])
    ix.remove([3, 4])
    ix.save()
    assert not p.with_name(p.name + ".tmp").exists()
    again = VectorIndex(p, DIM, "test:a")
    assert again.keys() == set(range(50)) - {3, 4}
    assert again.search(vecs[10], 1)[0][0] == 10
    assert again.deleted_fraction == pytest.approx(2 / 50)
    unsaved = VectorIndex(tmp_path / "new.usearch", DIM, "test:a")    # never saved: empty again
    unsaved.add([1], vecs[:1])
    assert len(VectorIndex(tmp_path / "new.usearch", DIM, "test:a")) == 0


def test_mismatch_refused(tmp_path, vecs):
    p = tmp_path / "v.usearch"
    ix = VectorIndex(p, DIM, "test:a")
    ix.add(range(5), vecs[:5])
    ix.save()
    with pytest.raises(IndexMismatch, match="test:a"):
        VectorIndex(p, DIM, "test:b")
    with pytest.raises(IndexMismatch, match="dim"):
        VectorIndex(p, DIM * 2, "test:a")
    p.with_name(p.name + ".json").unlink()
    with pytest.raises(IndexMismatch, match="unknown"):
        VectorIndex(p, DIM, "test:a")
    ix.save()                                           # the open instance writes it again
    assert json.loads(p.with_name(p.name + ".json").read_text())["embedder_id"] == "test:a"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(IndexMismatch, match="damaged"):
        VectorIndex(p, DIM, "test:a")
    p.write_bytes(b"not an index" * 10)
    with pytest.raises(IndexMismatch, match="damaged"):
        VectorIndex(p, DIM, "test:a")
    VectorIndex.discard(p)
    assert not p.exists()
    fresh = VectorIndex(p, DIM, "test:b")
    assert len(fresh) == 0
    assert json.loads(p.with_name(p.name + ".json").read_text())["embedder_id"] == "test:b"


@pytest.mark.parametrize("exact_max", [0, 10_000])     # both the ANN and the exact path
def test_filtered_search(tmp_path, vecs, monkeypatch, exact_max):
    monkeypatch.setattr(vmod, "EXACT_MAX", exact_max)
    ix = VectorIndex(tmp_path / "v.usearch", DIM, "test:a")
    ix.add(range(600), vecs)
    allowed = set(range(0, 600, 7))
    found = 0
    for qi in range(20):
        hits = ix.search(vecs[qi], 5, allowed)
        assert len(hits) == 5 and all(k in allowed for k, _ in hits)
        assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))
        want = brute(vecs[qi], vecs, sorted(allowed), 5)
        if exact_max:
            assert [k for k, _ in hits] == want
        found += len({k for k, _ in hits} & set(want))
    assert found >= 0.9 * 100          # HNSW is approximate (its build is multi-threaded)
    assert ix.search(vecs[0], 5, {3, 999999}) == [(3, pytest.approx(float(vecs[3] @ vecs[0]), abs=1e-5))]
    assert ix.search(vecs[0], 5, set()) == []


def test_remove_then_compact_keeps_results_for_live_keys(tmp_path, vecs):
    p = tmp_path / "v.usearch"
    ix = VectorIndex(p, DIM, "test:a")
    ix.add(range(600), vecs)
    removed = set(range(0, 600, 3))
    assert ix.remove(removed) == len(removed)
    assert ix.remove([0]) == 0
    live = sorted(set(range(600)) - removed)
    queries = unit(10, seed=1)
    before = [ix.search(q, 10, set(live)) for q in queries]
    assert ix.deleted_fraction == pytest.approx(len(removed) / 600)
    assert ix.compact()
    assert ix.deleted_fraction == 0.0 and ix.keys() == set(live)
    after = [ix.search(q, 10, set(live)) for q in queries]
    assert [[k for k, _ in h] for h in after] == [[k for k, _ in h] for h in before]
    for hb, ha in zip(before, after):
        assert [s for _, s in ha] == pytest.approx([s for _, s in hb], abs=1e-5)
    assert VectorIndex(p, DIM, "test:a").keys() == set(live)       # compaction saved it
    assert sum(ix.search(vecs[k], 1)[0][0] == k for k in live[:50]) >= 48   # the graph works (ANN)


class GatedIndex(vmod.Index):
    """The fresh index of a compaction: its first add waits until the test has written."""
    started = gate = None

    def add(self, *a, **kw):
        GatedIndex.started.set()
        assert GatedIndex.gate.wait(30)
        return super().add(*a, **kw)


def test_compaction_while_searching_and_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(vmod, "_COPY_BATCH", 64)       # many lock releases in a small index
    GatedIndex.started, GatedIndex.gate = threading.Event(), threading.Event()
    v = unit(3000, seed=2)
    ix = VectorIndex(tmp_path / "v.usearch", DIM, "test:a")
    ix.add(range(2000), v[:2000])
    ix.remove(range(0, 2000, 2))
    before = ix.deleted_fraction
    monkeypatch.setattr(ix, "_new", lambda: GatedIndex(ndim=DIM, metric="cos", dtype="f32"))
    stop, errors, searches = threading.Event(), [], [0]

    def searcher():
        try:
            while not stop.is_set():
                for qi in (1, 3, 1999):
                    top = ix.search(v[qi], 1)
                    assert top and top[0][0] == qi, top
                searches[0] += 1
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)
    t = threading.Thread(target=searcher)
    t.start()
    compactor = ix.start_compaction()
    assert GatedIndex.started.wait(30)                  # the rebuild is under way
    n_start = searches[0]
    # writes while the rebuild runs: they must reach the new index too
    added, dropped = list(range(2000, 2300)), list(range(5, 400, 2))
    for i in range(0, 300, 20):
        ix.add(added[i:i + 20], v[2000 + i:2020 + i])
    ix.remove(dropped)
    ix.add([7], v[2500:2501])                           # replaced during the rebuild
    assert not ix.compact()                              # one compaction at a time
    deadline = time.monotonic() + 10
    while searches[0] < n_start + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert searches[0] >= n_start + 3                   # searches go on during the rebuild
    GatedIndex.gate.set()
    compactor.join(timeout=30)
    stop.set()
    t.join()
    assert not compactor.is_alive() and not errors
    assert isinstance(ix._index, GatedIndex)            # swapped
    want = (set(range(1, 2000, 2)) - set(dropped)) | set(added) | {7}
    assert ix.keys() == want and ix.deleted_fraction < before
    assert ix.search(v[2500], 1)[0][0] == 7
    assert ix.search(v[2299], 1)[0][0] == 2299
    assert ix.search(v[9], 1)[0][0] != 9
    assert VectorIndex(tmp_path / "v.usearch", DIM, "test:a").keys() == want
