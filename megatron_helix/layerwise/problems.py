"""Argument checks that report every problem at once, in one ``ValueError``.

The shapes, workloads, plans and jobs of the planners check all their fields and list what is
wrong, rather than stopping at the first: these two helpers are the shared part.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence


def below_one(record: object, names: Iterable[str]) -> List[str]:
    """One problem for each named field of ``record`` that is set (not None) and below 1."""
    values = ((name, getattr(record, name)) for name in names)
    return [f"{name} must be >= 1, got {value}" for name, value in values
            if value is not None and value < 1]


def raise_problems(what: str, problems: Sequence[str]) -> None:
    """``ValueError`` ``"invalid {what}:"`` with one line per problem; nothing if none."""
    if problems:
        raise ValueError(f"invalid {what}:\n  - " + "\n  - ".join(problems))
