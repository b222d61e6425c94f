"""The model registry: the one writer (and the checked reader) of recloop model artefacts.

Training publishes here, serving loads from here, the online learner publishes deltas and
compression publishes compressed versions. One file per idea:

    store.py      Registry: versions on disk (install, checksums, verify, list, gc)
    manifest.py   the typed, validated Manifest (and the JSON policy of what it stores)
    deltas.py     the only code that understands deltas: diff, plan, chain walk, apply
    aliases.py    production, promote, rollback (aliases.json)
    sidefiles.py  the files beside the weights (vocabulary, item counts), by name
    publish.py    the one publish path of trainer, learner and compressor
    loading.py    version -> module
    table.py      the rich version table of ``recloop models list``
    files.py      file I/O of a version directory: checksums, durable writes, weights
"""

from recloop.registry.deltas import RowUpdate
from recloop.registry.files import WEIGHTS
from recloop.registry.loading import check_vocabulary, load_model, model_from_state
from recloop.registry.manifest import FORMAT_VERSION, MANIFEST, Manifest, VersionInfo
from recloop.registry.publish import Delta, SideFiles, publish_version
from recloop.registry.store import LATEST, PRODUCTION, Registry

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "PRODUCTION",
    "WEIGHTS",
    "Delta",
    "Manifest",
    "Registry",
    "RowUpdate",
    "SideFiles",
    "VersionInfo",
    "check_vocabulary",
    "load_model",
    "model_from_state",
    "publish_version",
]
