"""Typed request and response bodies of the HTTP API (they also make the OpenAPI docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recloop.serve.validation import MAX_K, VersionRef, WireId

MAX_SEQUENCE = 1000  # longest sequence a request may send (the model keeps its last max_length)
MAX_EVENTS = 1000  # events per POST /v1/events


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    """Top-k items for a user or an ad-hoc sequence."""

    cached: bool = Field(description="served from the result cache")
    arm: str | None = Field(
        None, description="the experiment arm that served the list (None: no experiment)"
    )
    model_version: str
    user_id: str | None = None
    items: list[ScoredItem]
    fallback: Literal["popularity"] | None = Field(
        None, description="set when the model could not be used (unknown user, empty sequence)"
    )
    unknown_items: list[str] = Field(
        default_factory=list, description="item ids of the input not in the model's vocabulary"
    )


class SequenceRequest(_Strict):
    """An anonymous user's recent items, oldest first."""

    items: list[WireId] = Field(max_length=MAX_SEQUENCE)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class SimilarItems(BaseModel):
    model_version: str
    item_id: str
    items: list[ScoredItem]


class Event(_Strict):
    user_id: WireId
    item_id: WireId
    timestamp: float | None = Field(None, description="seconds since the epoch; default: now")
    event_type: str = Field("interaction", max_length=64)
    value: float | None = None


class EventBatch(_Strict):
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


class UserEvents(BaseModel):
    user_id: str
    items: list[str] = Field(description="recent item ids from events, oldest first")


class EventsAccepted(BaseModel):
    accepted: int
    users: int
    durable: bool = Field(
        description="written to the durable event log before this answer (survives a crash)"
    )
    event_ids: list[str] = Field(
        default_factory=list,
        description="ids in the durable event log, in order (empty when the service has none)",
    )
    unknown_items: list[str] = Field(
        description="items not in the served model's vocabulary (stored; new-item candidates)"
    )


class ReloadRequest(_Strict):
    version: VersionRef | None = Field(None, description="version id, 'latest' or 'production'")


class ReloadResult(BaseModel):
    version: str
    previous: str | None
    swapped: bool
    loaded_in_seconds: float


class ArmInfo(BaseModel):
    name: str
    ref: str
    share: float
    model_version: str | None


class ExperimentInfo(BaseModel):
    """The experiment the service runs: users split between arms by a stable hash."""

    name: str
    control: str
    k: int
    arms: list[ArmInfo]


class ModelInfo(BaseModel):
    version: str
    model_type: str | None
    num_items: int
    max_length: int
    engine: str
    index: str
    created_at: str | None
    method: str | None
    parent: str | None
    metrics: dict[str, float]
    loaded_in_seconds: float
    history: bool
    details: dict[str, object] = Field(default_factory=dict)
    experiment: ExperimentInfo | None = Field(
        None, description="the arms, when an experiment runs (the fields above: the control)"
    )


class Problem(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]


class StateRebuild(BaseModel):
    """Progress of rebuilding in-process user state from the event log at start."""

    done: bool
    applied_offset: int
    target_offset: int
    events: int
    seconds: float
    events_per_second: float | None


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None  # why not ready (None when ready)
    model_version: str | None
    state: dict[str, object]
    state_rebuild: StateRebuild | None = None
    queue: int
