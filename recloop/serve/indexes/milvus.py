"""The Milvus item index: a collection behind an alias, searched through pymilvus.

Its own module so that pymilvus (and grpc) load only when a Milvus index is built. The URI is a
Milvus server or cluster (``http://host:19530``) in production, or a milvus-lite database file
(``*.db``: the embedded engine behind the same client API); by default a milvus-lite file in a
temporary directory the index owns and removes on :meth:`MilvusIndex.close`.

A build writes a NEW collection ``<alias>_<random>``, loads it, and only then points the alias at
it (``create_alias`` the first time, ``alter_alias`` after) and drops the collection the alias
pointed at before. Searches always go through the alias, so a search during a full reload sees
the old collection or the new one, never an empty or half-built one.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pymilvus import DataType, MilvusClient, MilvusException

from recloop.errors import IndexUnavailable, ServingError
from recloop.serve.indexes.base import (
    MILVUS_NAME,
    RECALL_K,
    FloatArray,
    IdArray,
    ItemIndex,
    check_index_uri,
    check_queries,
    check_table,
    default_nlist,
    exact_search,
    finish,
    mask_excluded,
    probe_queries,
    recall_at_k,
    tune_nprobe,
)

DEFAULT_ALIAS = "recloop_items"
# Milvus refuses a search limit above this (its topk bound); longer exclusion lists than the
# over-fetch can cover are searched row by row with an `id not in [...]` filter instead.
MAX_TOPK = 16384
INSERT_BYTES = 16 << 20  # rows per insert call: well under grpc's 64 MiB message limit
# Index types a collection may be built with. FLAT (the default) is exact; the others are ANN
# types that milvus-lite (through faiss) and Milvus servers both accept. On milvus-lite every
# search also walks every row in Python (dedup by primary key, tombstones) whatever the index
# type, so ANN saves little there (bench/scale_catalogue.py).
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")


class _Store:
    """The client and collection shared by an index and its ``updated`` copies; the last
    ``close`` drops the collection (unless a newer build took the alias over) and the client."""

    def __init__(self, client: MilvusClient, alias: str, collection: str, tmp: str | None):
        self.client, self.alias, self.collection, self.tmp = client, alias, collection, tmp
        self.users = 1
        self.lock = threading.Lock()
        self.error: str | None = None  # the last failed call's error, until one succeeds

    def acquire(self) -> _Store:
        with self.lock:
            self.users += 1
        return self

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users:
                return
        try:
            if _alias_target(self.client, self.alias) == self.collection:
                # Still ours: nothing newer is served behind it.
                self.client.drop_alias(self.alias)
            self.client.drop_collection(self.collection)  # no-op if a newer build dropped it
        finally:
            self.client.close()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)


class MilvusIndex(ItemIndex):
    """Items 1..N in a Milvus collection (inner product; FLAT by default: exact search).

    ``uri``: see the module docstring; ``alias``: the name searches go through (builds on the
    same URI and alias replace each other atomically). ``index_type`` (one of INDEX_TYPES)
    with its build ``index_params`` (e.g. ``{"nlist": 1024}``) and ``search_params`` (e.g.
    ``{"nprobe": 16}``, ``{"ef": 64}``) picks an ANN index instead. FLAT is exact, so
    ``recall`` is ~1.0; it is measured anyway at build (recall@10 vs exact on
    ``tune_queries``, else perturbed table rows, as IVF tunes) so the load reports what Milvus
    really returns, and what an ANN setting gives up.

    Exclusions over-fetch ``k + max(len(exclude[b]))`` and filter, one batched call (row by row
    with an ``id not in [...]`` filter past Milvus's topk bound). ``add`` upserts in place;
    ``updated`` upserts into the shared collection and returns an index that knows the new
    items: this one keeps its ``num_items`` and filters ``id <= num_items``, so it never returns
    items it does not know, but updated rows are seen by both (Milvus holds one copy; copying
    the collection per delta would double it).
    """

    kind = "milvus"

    def __init__(
        self,
        table: npt.ArrayLike,
        *,
        uri: str | None = None,
        alias: str = DEFAULT_ALIAS,
        tune_queries: npt.ArrayLike | None = None,
        seed: int = 0,
        index_type: str = "FLAT",
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        min_recall: float | None = None,
    ) -> None:
        checked = check_table(table)
        if not isinstance(alias, str) or not MILVUS_NAME.fullmatch(alias):
            raise ServingError(
                f"alias must be a Milvus name ([A-Za-z_][A-Za-z0-9_]*), got {alias!r}"
            )
        if index_type not in INDEX_TYPES:
            raise ServingError(
                f"index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}"
            )
        for name, params in (("index_params", index_params), ("search_params", search_params)):
            if params is not None and not isinstance(params, dict):
                raise ServingError(f"{name} must be a dict of Milvus parameters, got {params!r}")
        self.index_type = index_type
        self.index_params: dict[str, Any] = dict(index_params or {})
        self.search_params: dict[str, Any] = dict(search_params or {})
        self.num_items = len(checked) - 1
        self.dim = checked.shape[1]
        tmp = None
        if uri is None:  # milvus-lite in a folder this index owns
            tmp = tempfile.mkdtemp(prefix="recloop-milvus-")
            uri = str(Path(tmp) / "items.db")
        try:
            index = (index_type, dict(index_params or {}))
            self._store = _build(check_index_uri(uri), alias, checked, tmp, index)
        except BaseException:  # nothing half-made stays behind: not the folder, not a client
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._closed = False
        try:
            queries, truth = self._recall_probe(checked, tune_queries, seed)
            if min_recall is not None:
                self._tune(queries, truth, min_recall)
            else:
                self.recall = recall_at_k(self.search(queries, truth.shape[1])[0], truth)
        except BaseException:
            self.close()
            raise

    def _recall_probe(
        self, table: FloatArray, tune_queries: npt.ArrayLike | None, seed: int
    ) -> tuple[FloatArray, IdArray]:
        """The queries serving will send (else perturbed table rows) and their exact top-10:
        what the build measures recall@10 on (~1.0 for FLAT, and proof Milvus returns it)."""
        queries = (
            check_queries(tune_queries, self.dim)
            if tune_queries is not None
            else probe_queries(table, seed)
        )
        truth, _ = exact_search(table, queries, min(RECALL_K, self.num_items))
        return queries, truth

    def _tune(self, queries: FloatArray, truth: IdArray, min_recall: float) -> None:
        """IVF types: nprobe tuned as the in-process IVF index does (base.tune_nprobe)."""
        if not self.index_type.startswith("IVF"):
            raise ServingError(f"min_recall tunes IVF index types only, not {self.index_type}")

        def search_at(nprobe: int) -> IdArray:
            self.search_params["nprobe"] = nprobe
            return self.search(queries, truth.shape[1])[0]

        nlist = int(self.index_params.get("nlist", 128))
        self.nprobe, self.recall = tune_nprobe(search_at, truth, nlist, min_recall)

    @property
    def alias(self) -> str:
        return self._store.alias

    @property
    def collection(self) -> str:
        return self._store.collection

    def memory_bytes(self) -> int:
        """Estimate of what Milvus holds (in its process, not this one): rows + int64 ids."""
        return (self.num_items + 1) * (self.dim * 4 + 8)

    def close(self) -> None:
        if self._closed:  # idempotent: the store counts each index once
            return
        self._closed = True
        self._store.release()

    def unavailable(self) -> str | None:
        return self._store.error

    def probe(self) -> None:
        store = self._store
        try:
            store.client.describe_collection(store.alias)
        except MilvusException as exc:
            store.error = str(exc)
        else:
            store.error = None

    def _search(
        self, queries: FloatArray, k: int, exclude: list[IdArray]
    ) -> tuple[IdArray, FloatArray]:
        extra = max(len(e) for e in exclude)
        fetch = min(k + extra, self.num_items)
        if fetch > MAX_TOPK:  # the over-fetch cannot cover the exclusions: filter in Milvus
            rows = [
                self._query(q[None], min(k, MAX_TOPK), e)
                for q, e in zip(queries, exclude, strict=True)
            ]
            return finish(
                np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]), k
            )
        ids, scores = self._query(queries, fetch, None)
        if extra:
            mask_excluded(ids, scores, exclude, self.num_items)
        return finish(ids, scores, k)

    def _query(
        self, queries: FloatArray, limit: int, exclude: IdArray | None
    ) -> tuple[IdArray, FloatArray]:
        """One Milvus search as [B, limit] arrays padded with id 0 / -inf."""
        expression = f"id <= {self.num_items}"  # a newer copy may have appended items
        if exclude is not None and len(exclude):
            expression += f" and id not in {exclude.tolist()}"
        store = self._store
        try:
            hits = store.client.search(
                store.alias,
                data=queries.tolist(),
                limit=limit,
                filter=expression,
                output_fields=["id"],
                search_params={"metric_type": "IP", "params": self.search_params},
            )
        except MilvusException as exc:
            store.error = str(exc)
            raise IndexUnavailable(f"milvus search on {store.alias!r} failed: {exc}") from None
        store.error = None
        ids = np.zeros((len(queries), limit), dtype=np.int64)
        scores = np.full((len(queries), limit), -np.inf, dtype=np.float32)
        for row, found in enumerate(hits):
            ids[row, : len(found)] = [hit["id"] for hit in found]
            scores[row, : len(found)] = [hit["distance"] for hit in found]
        return ids, scores

    def _vectors(self, ids: IdArray) -> FloatArray:
        unique = np.unique(ids)
        store = self._store
        rows = store.client.get(store.alias, ids=unique.tolist(), output_fields=["vector"])
        found = {int(row["id"]): row["vector"] for row in rows}
        missing = [int(i) for i in unique if int(i) not in found]
        if missing:  # a newer build behind the alias has fewer items
            raise ServingError(f"ids {missing[:5]} are not in milvus collection {store.alias!r}")
        table = np.asarray([found[int(i)] for i in unique], dtype=np.float32).reshape(-1, self.dim)
        return table[np.searchsorted(unique, ids)]

    def _add(self, ids: IdArray, vectors: FloatArray) -> None:
        _upsert(self._store.client, self._store.alias, ids, vectors)
        self._store.client.flush(self._store.alias)  # where the upsert went; see _create
        self.num_items = int(ids.max(initial=self.num_items))

    def _updated(self, ids: IdArray, vectors: FloatArray) -> MilvusIndex:
        clone = MilvusIndex.__new__(MilvusIndex)
        clone.__dict__.update(self.__dict__)
        clone._store = self._store.acquire()
        clone._closed = False
        clone._add(ids, vectors)
        return clone


def _build(
    uri: str, alias: str, table: FloatArray, tmp: str | None, index: tuple[str, dict[str, Any]]
) -> _Store:
    """A new collection with the table's items, published under ``alias``."""
    client = _connect(uri)
    collection = f"{alias}_{uuid.uuid4().hex[:12]}"
    try:
        _create(client, collection, table, index)
        _publish(client, alias, collection)
    except MilvusException as exc:
        with contextlib.suppress(MilvusException):  # the alias still names the old one
            client.drop_collection(collection)
        client.close()
        raise ServingError(f"index_uri {uri!r}: building the collection failed: {exc}") from None
    return _Store(client, alias, collection, tmp)


def _connect(uri: str) -> MilvusClient:
    try:
        return MilvusClient(uri=uri)
    except MilvusException as exc:
        raise ServingError(f"index_uri {uri!r}: cannot connect to Milvus: {exc}") from None


def _create(
    client: MilvusClient, collection: str, table: FloatArray, index: tuple[str, dict[str, Any]]
) -> None:
    """The collection with every item row, indexed and loaded (searchable in full)."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=table.shape[1])
    # Session consistency: this client's upserts are searchable as soon as they return (as
    # ItemIndex.add says), and only this client (its replica) writes the collection behind its
    # alias. Strong would make every search wait for the server's next time tick: 200 ms per
    # search against 5 ms on a Milvus 2.3 server here (scratch run, issue 22); milvus-lite
    # answers the same either way.
    client.create_collection(collection, schema=schema, consistency_level="Session")
    _upsert(client, collection, np.arange(1, len(table), dtype=np.int64), table[1:], insert=True)
    # Flushed, then indexed, then loaded. milvus-lite searches rows still in its memtable by
    # brute force in Python (200k unflushed rows: ~2 s a search, flushed: ~0.1 s), and an index
    # declared at create_collection is built by a background thread after each flush, so
    # searches right after the load could meet segments still without it; create_index on the
    # flushed segments builds them before it returns.
    client.flush(collection)
    params = client.prepare_index_params()
    # FLAT (the default): exact, and accepted by milvus-lite and servers alike. Build
    # parameters nested under "params" (one JSON value): pymilvus 3 sends a flat dict as one
    # key each, which milvus-lite 3.2 ignores (it reads only "params": IVF kept nlist 128).
    index_type, index_params = index
    nested = {"params": index_params} if index_params else {}
    params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=nested)
    client.create_index(collection, params)
    client.load_collection(collection)


def _upsert(
    client: MilvusClient, name: str, ids: IdArray, vectors: FloatArray, *, insert: bool = False
) -> None:
    step = max(1, INSERT_BYTES // (vectors.shape[1] * 4 + 8))
    write: Any = client.insert if insert else client.upsert
    for start in range(0, len(ids), step):
        rows = [
            {"id": int(i), "vector": v}
            for i, v in zip(
                ids[start : start + step].tolist(),
                vectors[start : start + step].tolist(),
                strict=True,
            )
        ]
        write(name, rows)


def _publish(client: MilvusClient, alias: str, collection: str) -> None:
    """Points ``alias`` at ``collection`` in one step, then drops the one it pointed at."""
    previous = _alias_target(client, alias)
    if previous is not None:
        client.alter_alias(collection, alias)
    else:
        client.create_alias(collection, alias)
    if previous and previous != collection:
        client.drop_collection(previous)


def _alias_target(client: MilvusClient, alias: str) -> str | None:
    """The collection ``alias`` points at, or None when there is no such alias."""
    # Listed first: describe_alias on a missing alias works but pymilvus logs an ERROR for it.
    if alias not in client.list_aliases().get("aliases", []):
        return None
    target = client.describe_alias(alias).get("collection_name")
    return str(target) if target else None


def milvus_ivf(
    table: npt.ArrayLike,
    *,
    nlist: int | None = None,
    min_recall: float = 0.95,
    **options: Any,
) -> MilvusIndex:
    """The ``milvus-ivf`` kind: an IVF_FLAT collection (``nlist`` lists, by default as many as
    the in-process IVF index would use) with nprobe tuned at build to ``min_recall``."""
    num_items = len(check_table(table)) - 1
    lists = default_nlist(num_items) if nlist is None else nlist
    return MilvusIndex(
        table,
        index_type="IVF_FLAT",
        index_params={"nlist": lists},
        min_recall=min_recall,
        **options,
    )
