"""Class names for the model's output index."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

IMAGENET = Path(__file__).parent / "data" / "imagenet_classes.txt"


@lru_cache(maxsize=8)
def load_labels(path: str | None, num_classes: int) -> tuple[str, ...]:
    """Labels from ``path``; ImageNet's for 1000-class models; else "class_<i>"."""
    if path is None and num_classes == 1000:
        path = str(IMAGENET)
    if path is None:
        return tuple(f"class_{i}" for i in range(num_classes))
    names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    if len(names) != num_classes:
        raise ValueError(f"{path} has {len(names)} labels but the model has {num_classes} classes")
    return names
