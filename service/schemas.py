"""HTTP request and response models of the ranking API (DESIGN.md, contract 4).

Ids are strict int64: a string, a float or a bool where an id belongs is a 422 naming the
field, never a silent conversion. The candidate-count limit is a setting, so the route
enforces it (`too_long_error`) with the same error shape pydantic gives.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from feature_store.events import MAX_EVENT_ID_BYTES

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]


class Candidate(BaseModel):
    """One ad from the matching stage: its raw item id and, if known, its category id.

    Without `cate_id` the service looks the category up in the feature store's ad features.
    """

    item_id: Int64
    cate_id: Int64 | None = None


class RankRequest(BaseModel):
    user_id: Int64
    candidates: list[Candidate] = Field(min_length=1, description="Ads to rank; at most MAX_CANDIDATES.")
    top_k: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        default=None, description="Return only the k best; default: all candidates. At most MAX_TOP_K."
    )
    explain: Annotated[bool, Field(strict=True)] = Field(
        default=False,
        description="Also return the attention of every returned candidate over the user's history, and the "
        "history itself (docs/explain.md). Returned candidates x the model's max_history must stay within "
        "MAX_EXPLAIN_CELLS.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": 42,
                    "candidates": [{"item_id": 7, "cate_id": 3}, {"item_id": 42, "cate_id": 5}],
                    "top_k": 10,
                }
            ]
        }
    )


class RankedItem(BaseModel):
    item_id: int
    cate_id: int | None = Field(description="The category scored with; null: the ad was sent without one and is unknown to the store.")
    ctr: float = Field(ge=0.0, le=1.0, description="Predicted click-through rate.")
    attention: list[float] | None = Field(
        default=None,
        description="explain only, and only when attention_available: the weight of each behaviour of `history` "
        "(same order, newest first; history_length of them) for this candidate. Not normalised (no softmax), "
        "may be negative: the activation strength is |w|.",
    )


class Behaviour(BaseModel):
    """One behaviour of the user's history, as the model saw it."""

    item_id: int
    cate_id: int
    timestamp: int


class RankResponse(BaseModel):
    model_version: str = Field(description="The model that scored this request.")
    user_id: int
    history_length: int = Field(ge=0, description="Behaviours the model attended to (after truncation).")
    degraded: bool = Field(description="True when the history store failed and the user was ranked without history.")
    ranked: list[RankedItem] = Field(description="Candidates sorted by ctr, descending (ties keep request order).")
    history: list[Behaviour] | None = Field(
        default=None,
        description="explain only: the behaviours the model attended to, newest first (history_length of them).",
    )
    attention_available: bool | None = Field(
        default=None,
        description="explain only: false for models without attention (BaseModel and other baselines); then "
        "no candidate carries `attention`.",
    )


class ErrorItem(BaseModel):
    """One problem with a request, in FastAPI's validation-error shape."""

    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "candidates", 3, "item_id"].')
    msg: str
    type: str
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    detail: list[ErrorItem]


class Readiness(BaseModel):
    """Body of /readyz: 200 when the model is loaded and warmed, 503 naming what is not.

    The store does not decide readiness (every replica shares it: failing them all on a
    Redis outage would turn degraded answers into no answers); its state is reported here.
    """

    ready: bool
    model: str = Field(description='"ok" or what is wrong with the model.')
    store: str = Field(description='"ok" or what is wrong with the history store.')
    degraded: bool = Field(default=False, description="True when /rank answers now rank without histories.")
    store_url: str | None = Field(default=None, description="The history store's URL, password hidden.")
    store_circuit: str | None = Field(default=None, description="closed, open or half_open.")
    model_version: str | None = None
    providers: list[str] = Field(default_factory=list, description="ONNX Runtime execution providers in use.")


class ErrorBody(BaseModel):
    """A refusal or failure: what went wrong, in words (never a traceback or a server path)."""

    detail: str
    request_id: str | None = Field(default=None, description="Quote it when reporting a 500.")


class ReloadRequest(BaseModel):
    bundle: str | None = Field(
        default=None,
        max_length=4096,
        pattern=r"^[^\x00-\x1f\x7f]*$",  # no control characters: no path has them, and a newline would forge log lines
        description="A bundle directory on the server, or a directory of bundles (its newest is taken). "
        "Default: the BUNDLE setting, re-read (so a new `latest` there is picked up).",
    )


class ReloadResponse(BaseModel):
    model_version: str = Field(description="The model serving from now on.")
    previous_version: str | None
    changed: bool = Field(description="False when that bundle was already serving (nothing swapped).")
    load_seconds: float = Field(ge=0, description="Load + warm-up time of the new model.")


class ReloadRefusal(BaseModel):
    detail: str = Field(description="Why the bundle was refused.")
    model_version: str | None = Field(description="The model that keeps serving.")


def too_long_error(field: str, limit: int, actual: int, setting: str) -> dict[str, Any]:
    """A pydantic-shaped `too_long` error for a list above a limit that lives in settings."""
    return {
        "loc": ["body", field],
        "msg": f"List should have at most {limit} items after validation, not {actual} ({setting}={limit})",
        "type": "too_long",
        "ctx": {"field_type": "List", "max_length": limit, "actual_length": actual},
    }


def too_large_error(field: str, limit: int, setting: str) -> dict[str, Any]:
    return {
        "loc": ["body", field],
        "msg": f"Input should be less than or equal to {limit} ({setting}={limit})",
        "type": "less_than_equal",
        "ctx": {"le": limit},
    }


EVENT_ID_MAX = MAX_EVENT_ID_BYTES  # bytes of UTF-8: the store's own limit


class Event(BaseModel):
    """One behaviour (an impression that was clicked, a view...) of a user, for their history."""

    user_id: Int64
    item_id: Int64
    cate_id: Int64
    timestamp: Int64 = Field(description="In the unit of the loaded log; orders the history (newest first).")
    event_id: str = Field(
        min_length=1, max_length=EVENT_ID_MAX,
        description="Unique per event, chosen by the sender: a retried batch with the same ids is not appended "
        f"twice. At most {EVENT_ID_MAX} bytes in UTF-8.",
    )

    @field_validator("event_id")
    @classmethod
    def _event_id_bytes(cls, v: str) -> str:
        """The store's limit is on UTF-8 bytes, `max_length` counts characters ("é" is 2 bytes):
        check the bytes here so an over-long id is a 422 naming the field, not a 500 later."""
        n = len(v.encode())  # (pydantic already refused lone surrogates: string_unicode)
        if n > EVENT_ID_MAX:
            raise PydanticCustomError(
                "string_too_long", "String should have at most {max_length} bytes in UTF-8, not {actual_length}",
                {"max_length": EVENT_ID_MAX, "actual_length": n},
            )
        return v


class EventsRequest(BaseModel):
    events: list[Event] = Field(min_length=1, description="Behaviours to append; at most MAX_EVENTS.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"events": [{"user_id": 42, "item_id": 7, "cate_id": 3, "timestamp": 1700000000, "event_id": "c-8f1e"}]}]
        }
    )


class EventsResponse(BaseModel):
    events: int = Field(description="Events in the request.")
    applied: int = Field(description="Appended to a history now.")
    duplicates: int = Field(description="Already appended before (same user and event_id): not appended again.")
    users: int
    data_version: str = Field(description="The live data version the events went into.")
