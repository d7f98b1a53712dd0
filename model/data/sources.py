"""Data SPEC strings -> behaviour logs: `synthetic`, `events:PATH` (and more, one line each).

A SPEC is `scheme` or `scheme:argument`. Each scheme maps to one loader taking the
argument (an empty string when there is none); adding a dataset is one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable

from model.data.amazon import load_amazon
from model.data.log import BehaviourLog, read_log
from model.data.movielens import load_movielens
from model.data.synthetic import DEFAULT_SYNTHETIC, generate


def _synthetic(arg: str) -> BehaviourLog:
    if arg:
        raise ValueError(
            f"data spec 'synthetic:{arg}' takes no argument; use 'synthetic' for the default "
            "population, or write a custom one with `din synth` and pass 'events:PATH'"
        )
    return generate(DEFAULT_SYNTHETIC)  # deterministic, ~0.1 s: no cache needed


def _events(arg: str) -> BehaviourLog:
    if not arg:
        raise ValueError("data spec 'events:PATH' needs a path to a Parquet or CSV behaviour log")
    return read_log(arg)


SOURCES: dict[str, Callable[[str], BehaviourLog]] = {
    "synthetic": _synthetic,
    "events": _events,
    "movielens": load_movielens,
    "amazon": load_amazon,
}


def load_source(spec: str) -> BehaviourLog:
    """Load the behaviour log a SPEC names; an unknown scheme is a ValueError listing the known."""
    scheme, _, arg = spec.partition(":")
    loader = SOURCES.get(scheme.strip().lower())
    if loader is None:
        valid = ", ".join(f"{s}:PATH" if s != "synthetic" else s for s in SOURCES)
        raise ValueError(f"unknown data spec {spec!r}; valid specs are: {valid}")
    return loader(arg)
