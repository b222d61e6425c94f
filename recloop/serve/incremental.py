"""`recloop serve --incremental-encoding`: users encoded from their cached HSTU keys and values
plus the events since, instead of their whole window (see :mod:`recloop.models.hstu_kv`).

Per request with a user id, on the compute thread: the user's state is read from the
:class:`~recloop.serve.state.kv.KVStore` under (served version, user) and matched against the
window the engine would encode (the last ``max_length`` items of the user's sequence):

- the state's items are the start of the window: only the rest is encoded (exact);
- the window is full (``max_length`` items): under ``recompute`` (exact) the engine encodes it,
  as without this option, since every new event would slide it and the cache cannot help;
- the window slid (it was full, or the state store, which keeps ``state_max_length`` recent
  events per user, dropped the oldest): the state's items still in the window are found;
  ``drop-oldest`` (approximate) keeps them as cached and encodes only the new items,
  ``recompute`` encodes the window in full;
- anything else (no state, history rewritten, more than ``MAX_NEW_EVENTS`` new items): the whole
  window, in full, and stored.

The state is written back after the encode. The torch model of the bundle computes all of this
(ONNX Runtime has no cache inputs); requests without a user id still go to the engine.
Serving sends no timestamps to the models, so the states are untimed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from recloop.errors import ConfigError, ServingError
from recloop.models.base import SequentialEncoder
from recloop.models.hstu_kv import WINDOW_POLICIES, IncrementalHSTU, UserKV
from recloop.serve.state.kv import KVStore, open_kv_store

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
KV_URLS = ("memory", "redis://", "rediss://", "unix://")
MAX_NEW_EVENTS = 256  # more new items than this since the cached state: encode in full


def check_options(enabled: object, window: object, max_bytes: object, url: object) -> None:
    """The `recloop serve` incremental options, checked (LoadOptions.__post_init__)."""
    if url is not None and not (isinstance(url, str) and url.startswith(KV_URLS)):
        raise ConfigError(f"kv_url must be memory or a redis:// URL, got {url!r}")
    if not isinstance(enabled, bool):
        raise ConfigError(f"incremental_encoding must be true or false, got {enabled!r}")
    if window not in WINDOW_POLICIES:
        raise ConfigError(
            f"incremental_window (--incremental-window) must be one of "
            f"{', '.join(WINDOW_POLICIES)}, got {window!r}"
        )
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError(
            f"kv_cache_bytes (--kv-cache-mb) must be a positive size, got {max_bytes!r}"
        )


class IncrementalEncoding:
    """A bundle's user encoder under --incremental-encoding (one per served version)."""

    def __init__(
        self, model: SequentialEncoder, version: str, store: KVStore, window: str = "recompute"
    ) -> None:
        try:
            self.encoder = IncrementalHSTU(model.eval(), window)
        except ConfigError as exc:
            raise ConfigError(f"--incremental-encoding: version {version}: {exc}") from None
        self.version = version
        self.store = store
        self.max_length = self.encoder.max_length
        self.num_items = int(model.item_embedding.num_items)
        self.model = model
        # Encoded by the engine (no user, or a full window under "recompute"); in full by the
        # torch model (no usable state; the state stored); from their state; unchanged (no new
        # items); and of those from their state, how many slid (drop-oldest dropped some).
        self.counts = {"engine": 0, "full": 0, "incremental": 0, "unchanged": 0, "slid": 0}

    def for_version(self, model: SequentialEncoder, version: str) -> IncrementalEncoding:
        """The encoder of the next version (a delta), sharing the store: the old version's
        states are dropped (new weights, new keys and values) unless the store is shared."""
        _drop_other_versions(self.store, version)
        return IncrementalEncoding(model, version, self.store, self.encoder.window)

    def encode(
        self,
        users: Sequence[str | None],
        sequences: Sequence[IdArray],
        engine_encode: Callable[[list[IdArray]], FloatArray],
    ) -> FloatArray:
        """Query vectors [B, D]: users from their states; the engine encodes requests without a
        user (None) and, under "recompute", full windows (the cache cannot help them)."""
        windows = [self._window(sequence) for sequence in sequences]
        recompute = self.encoder.window == "recompute"
        cached = [
            row
            for row, user in enumerate(users)
            if user is not None and not (recompute and windows[row].size == self.max_length)
        ]
        others = sorted(set(range(len(users))) - set(cached))
        self.counts["engine"] += len(others)
        result: FloatArray | None = None
        if others:
            found = np.array(engine_encode([sequences[row] for row in others]))
            result = np.zeros((len(users), found.shape[1]), dtype=np.float32)
            result[others] = found
        if cached:
            vectors = self._encode_users(
                [users[row] or "" for row in cached], [windows[row] for row in cached]
            )
            if result is None:
                result = np.zeros((len(users), vectors.shape[1]), dtype=np.float32)
            result[cached] = vectors
        if result is None:
            raise ServingError("incremental encoding: an empty batch")
        return result

    def _encode_users(self, users: list[str], windows: list[IdArray]) -> FloatArray:
        device = next(self.model.parameters()).device  # the torch engine may have moved it
        states, news = [], []
        for user, window in zip(users, windows, strict=True):
            payload = self.store.get(self.version, user)
            stored = decode_state(payload, device) if payload is not None else None
            state, new = plan(stored, window, self.encoder.window)
            self._count(stored, state, new.size)
            states.append(state)
            news.append(torch.from_numpy(new).to(device))
        vectors, done = self.encoder.encode(states, news)  # on the model's device
        for user, fresh, state in zip(users, news, done, strict=True):
            if fresh.numel():
                self.store.put(self.version, user, encode_state(state))
        with torch.inference_mode():  # as the engine's QueryModule: normalised, temperature
            queries: torch.Tensor = self.model.item_embedding.prepare_query(vectors)
        result: FloatArray = queries.cpu().numpy().astype(np.float32, copy=False)
        return result

    def _count(self, stored: UserKV | None, state: UserKV | None, new: int) -> None:
        if state is None:
            self.counts["full"] += 1
        elif new == 0:
            self.counts["unchanged"] += 1
        else:
            self.counts["incremental"] += 1
            self.counts["slid"] += int(stored is not None and state.length < stored.length)

    def _window(self, sequence: IdArray) -> IdArray:
        window = np.asarray(sequence, dtype=np.int64)[-self.max_length :]
        if window.size == 0 or int(window.min()) < 1 or int(window.max()) > self.num_items:
            raise ServingError(
                f"incremental encoding: a sequence is empty or has ids outside 1..{self.num_items}"
            )
        return window

    def status(self) -> dict[str, Any]:
        return {"window": self.encoder.window, **self.counts, **self.store.status()}


def plan(state: UserKV | None, window: IdArray, policy: str) -> tuple[UserKV | None, IdArray]:
    """(state to extend or None, the items to encode after it) for the ``window`` to encode.

    The window slid when its first items are no longer the state's first: the model's window
    was full, or the state store dropped the user's oldest events. Then "recompute" encodes the
    window in full (exact) and "drop-oldest" keeps the cached positions still in it."""
    if state is None:
        return None, window
    cached = state.ids.cpu().numpy()
    n, w = cached.size, window.size
    if w >= n and np.array_equal(window[:n], cached):
        return state, window[n:]  # the state is the start of the window (nothing new: empty)
    # Slid: the last `kept` cached items start the window, then `w - kept` new ones follow.
    for new in range(max(1, w - n + 1), min(w, MAX_NEW_EVENTS + 1)):
        kept = w - new
        if np.array_equal(cached[n - kept :], window[:kept]):
            if policy == "recompute":
                break
            return state.drop_oldest(n - kept), window[kept:]
    return None, window


def encode_state(state: UserKV) -> bytes:
    """A state as safetensors bytes (no pickle)."""
    tensors = {
        "ids": state.ids,
        "keys": state.keys,
        "values": state.values,
        "vector": state.vector,
    }
    if state.timestamps is not None:
        tensors["timestamps"] = state.timestamps
    return save_tensors(
        {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    )


def decode_state(payload: bytes, device: torch.device) -> UserKV:
    tensors = {name: value.to(device) for name, value in load_tensors(payload).items()}
    return UserKV(
        ids=tensors["ids"],
        timestamps=tensors.get("timestamps"),
        keys=tensors["keys"],
        values=tensors["values"],
        vector=tensors["vector"],
    )


def incremental_for(
    model: SequentialEncoder,
    version: str,
    enabled: bool,
    window: str,
    max_bytes: int,
    url: str | None = None,
) -> IncrementalEncoding | None:
    """The incremental encoder a freshly loaded bundle gets (None when not asked for); a model
    that cannot be encoded incrementally is a ConfigError, so nothing is served half-set."""
    if not enabled:
        return None
    encoding = IncrementalEncoding(model, version, open_kv_store(url, max_bytes), window)
    _drop_other_versions(encoding.store, version)
    return encoding


def _drop_other_versions(store: KVStore, version: str) -> None:
    """Frees an in-process store of the versions this lineage no longer serves. A shared store
    (Redis) is left alone: other replicas mid-rollout, or other experiment arms, may serve them;
    entries never read again age out of its LRU."""
    if not store.shared:
        store.retain(version)
