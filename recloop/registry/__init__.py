"""The model registry: the one writer (and the checked reader) of recloop model artefacts.

Training publishes here, serving loads from here, the online learner publishes deltas and
compression publishes compressed versions. One file per idea:

    store.py      Registry: versions on disk (install, checksums, verify, list, gc)
    manifest.py   the typed, validated Manifest (and the JSON policy of what it stores)
    deltas.py     the only code that understands deltas: diff, plan, chain walk, apply
    aliases.py    production, promote, rollback (aliases.json)
    sidefiles.py  the files beside the weights (vocabulary, item counts), by name
    publish.py    the one publish path of trainer, learner and compressor
    shards.py     sharding plans (how a table is split over ranks)
    sharded.py    sharded versions: one file per shard, gathered or read by block
    loading.py    version -> module
    table.py      the rich version table of ``recloop models list``
    files.py      file I/O of a version directory: checksums, durable writes, weights
"""

from recloop.registry.deltas import RowUpdate
from recloop.registry.files import WEIGHTS
from recloop.registry.loading import check_vocabulary, load_model, model_from_state
from recloop.registry.manifest import FORMAT_VERSION, MANIFEST, Manifest, VersionInfo
from recloop.registry.publish import Delta, SideFiles, publish_version
from recloop.registry.sharded import ShardedTable, write_shard
from recloop.registry.shards import TENSOR_NAME, ShardingPlan, TableShard
from recloop.registry.store import LATEST, PRODUCTION, Registry

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "PRODUCTION",
    "TENSOR_NAME",
    "WEIGHTS",
    "Delta",
    "Manifest",
    "Registry",
    "RowUpdate",
    "ShardedTable",
    "ShardingPlan",
    "SideFiles",
    "TableShard",
    "VersionInfo",
    "check_vocabulary",
    "load_model",
    "model_from_state",
    "publish_version",
    "write_shard",
]
