"""Fixed batch shapes: every batch a worker runs has one of a few row counts.

On a GPU the first run at a new input shape costs 100-760 ms while cuDNN picks its
convolution algorithms (and a CUDA graph is captured per shape). A batcher free to form
any size from 1 to 128 keeps paying that, so batches are padded up to a *bucket*
(Triton's ``preferred_batch_size``, enforced), every bucket is warmed before a worker
says it is ready, and placement reasons about bucket sizes, since a batch of 9 rows
costs what a batch of 16 does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, and ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return tuple(out) + (max_batch,)


def check_buckets(buckets: Iterable[int] | None, max_batch: int) -> tuple[int, ...]:
    """The bucket set a cluster uses; raises ValueError naming what is wrong.

    The largest bucket must be ``max_batch``: a full batch needs a shape, and a bucket
    above it would never be formed yet still be warmed."""
    if buckets is None:
        return default_buckets(max_batch)
    values = list(buckets)
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise ValueError(f"{values!r}: buckets are a list of positive integers")
    out = tuple(sorted(set(values)))
    if out[-1] != max_batch:
        raise ValueError(f"the largest bucket ({out[-1]}) must equal max-batch-size ({max_batch})")
    return out


def model_buckets(batch_dim: int | None, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets one model can take: a fixed batch dimension allows that size only,
    a model without a batch dimension (``None``) none at all (it is never padded)."""
    if batch_dim is None:
        return ()
    return (batch_dim,) if batch_dim > 0 else buckets


def batch_shapes(batch_dim: int | None, max_batch: int, cluster: list[int] | None) -> tuple[int, tuple[int, ...]]:
    """A front end's largest batch and the buckets its batches run at: a fixed batch
    dimension caps batches at that size; the buckets are the cluster's (its scheduler's
    setting, which every worker pads to), else the defaults."""
    most = min(max_batch, batch_dim) if batch_dim is not None and batch_dim > 0 else max_batch
    return most, model_buckets(batch_dim, tuple(cluster or default_buckets(most)))


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``rows`` (the largest when none does)."""
    for b in buckets:
        if b >= rows:
            return b
    return buckets[-1]


def floor_bucket(rows: int, buckets: tuple[int, ...]) -> int:
    """The largest bucket not above ``rows`` (the smallest when none is): a batch cut
    to this many rows is all real work, no padding."""
    best = buckets[0]
    for b in buckets:
        if b <= rows:
            best = b
    return best


class Chunk(NamedTuple):
    start: int  # first row of the stacked batch
    rows: int  # real rows in this chunk
    bucket: int  # rows the session runs: ``rows`` plus padding


def chunks(rows: int, buckets: tuple[int, ...]) -> list[Chunk]:
    """How a stacked batch of ``rows`` rows runs: in chunks of the largest bucket, the
    rest padded to its bucket. More rows than the largest bucket happens only when a
    front end's max-batch-size exceeds the cluster's; it still never makes a new shape."""
    out, start, top = [], 0, buckets[-1]
    while rows - start > top:
        out.append(Chunk(start, top, top))
        start += top
    if rows > start:
        out.append(Chunk(start, rows - start, bucket_for(rows - start, buckets)))
    return out
