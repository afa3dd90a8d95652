"""Progress bars on every loop over images: on when asked, off when asked, else only on a terminal."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm import tqdm  # plain text bars: work in terminals and notebooks without ipywidgets

T = TypeVar("T")


def track(iterable: Iterable[T], desc: str, progress: bool | None = None, unit: str = "img", **kwargs) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    return tqdm(iterable, desc=desc, unit=unit, disable=None if progress is None else not progress, **kwargs)
