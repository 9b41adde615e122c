"""Which face a request is about, as one rule for the server and the operator tools."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

Face = TypeVar("Face")


def best_face(faces: Iterable[Face], area: Callable[[Face], float], score: Callable[[Face], float]) -> Face:
    """The face a verification (or a liveness check) is about: the largest box, ties to the
    detector's higher score. In a verification photo the subject is the person closest to the
    camera; a bystander is smaller (README, "How a verification is decided")."""
    return max(faces, key=lambda face: (area(face), score(face)))
