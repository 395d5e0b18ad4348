"""The run store: every row a method generates is committed here, so a run can be killed at any moment
(SIGKILL, OOM, power loss) and resumed with nothing lost that was committed and nothing duplicated.

Layout of a run directory OUT:

    config.json                        written once at creation: format, config, config_hash, identity, created
    stages/<stage>/<writer>-<seq>-<sha16>.parquet    committed rows: columns key, row (JSON of the whole row)
    rejects/<stage>/<writer>-<seq>-<sha16>.parquet   committed rejects: key, stage, reason, duplicate_of,
                                                     detail, row
    stats/<writer>.json                each writer's cumulative record() sums (replaced atomically per commit)
    locks/<writer>.lock                flock held by the live process of that writer id
    quarantine/...                     shards that failed verification, with a .why file each
    manifest.json                      summary rebuilt from the above, replaced atomically
    data/train-00000-of-0000N.parquet  published dataset (finalize); columnar, one schema
    rejects/_quality/*.parquet         rows removed by the quality filters (finalize)
    README.md                          dataset card (finalize)

A shard is self-verifying: `sha16` is the first 16 hex digits of the sha256 of its bytes. A commit writes
a temp file (name starting with ".tmp-<writer>-"), fsyncs it, renames it to its final name and fsyncs the
directory, so the committed set is exactly the set of well-named shard files: no journal to keep in step.
Several writers (replicas) may share OUT; each writes only files named with its own writer id.

Crash tests: SDG_KILL_AT="<point>:<n>" makes the process SIGKILL itself the n-th time it reaches <point>,
one of KILL_POINTS (before_shard_write, shard_write [temp file half written], after_rename,
manifest_write [temp half written], after_commit).

    >>> with RunStore.open("runs/demo", {"method": "tdg", "seed": 0}) as store:  # doctest: +SKIP
    ...     for key in sorted({"k1", "k2"} - store.done_keys("gen")):
    ...         store.add("gen", {"key": key, "text": "..."})
    ...         store.maybe_commit()
"""
from __future__ import annotations

from engine.store.files import KILL_POINTS
from engine.store.manifest import ManifestMixin
from engine.store.publish import DATA_SHARD_ROWS, PublishMixin, export
from engine.store.runs import FORMAT, ConfigMismatch, StoreError, canonical_config, config_hash
from engine.store.shards import REJECT_SCHEMA, ROW_SCHEMA, Shard, ShardStore


class RunStore(ShardStore, ManifestMixin, PublishMixin):
    """One writer's handle on a run directory: shards and their index (engine.store.shards), the manifest
    (engine.store.manifest), publishing (engine.store.publish). Not thread-safe: one thread per handle;
    replicas use one handle each, with distinct writer ids."""


__all__ = ["RunStore", "StoreError", "ConfigMismatch", "FORMAT", "KILL_POINTS", "DATA_SHARD_ROWS", "ROW_SCHEMA",
           "REJECT_SCHEMA", "Shard", "canonical_config", "config_hash", "export"]
