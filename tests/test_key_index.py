"""engine.store.index.KeyIndex against a Python set: membership and distinct counts after every kind of batch
(repeats within and across batches, keys already merged), with a tiny merge size so many levels form."""
import random

from engine.store import index
from engine.store.index import KeyIndex


def test_key_index_matches_a_set(monkeypatch):
    monkeypatch.setattr(index, "MERGE_AT", 7)
    keys, reference, rnd = KeyIndex(), set(), random.Random(0)
    for step in range(3000):
        batch = [f"k{rnd.randrange(5000)}" for _ in range(rnd.randrange(1, 5))]
        keys.update(batch)
        reference.update(batch)
        if step % 97 == 0:
            assert len(keys) == len(reference)
            probes = [f"k{rnd.randrange(6000)}" for _ in range(50)]
            assert [p in keys for p in probes] == [p in reference for p in probes]
            assert keys.holds(index.key_hashes(probes)).tolist() == [p in reference for p in probes]
    assert len(keys) == len(reference)
    assert len(keys._levels) > 2  # the levels did form: the test exercised merging across them
    sizes = [len(level) for level in keys._levels]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
