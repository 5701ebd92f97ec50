"""The model names a cluster serves, from the one model file it holds.

An image classifier (one float32 [N, 3, S, S] input) is served twice:

- ``<name>``: the file as it is, float32 NCHW, normalised by the client;
- ``<name>-uint8``: the same classifier behind in-graph preprocessing, so it takes the
  uint8 NHWC RGB pixels a decoder produces (a quarter of the bytes) and casts, scales,
  normalises and transposes on the model's device. ``/v1/classify`` feeds this one.

Two names rather than a second input: each name's metadata then lists exactly the
inputs a request must send, so tritonclient and perf_analyzer work unmodified on both
(neither can tell "one of these two inputs" from "both"). The worker builds the second
graph itself from the first (``worker_setup.preprocess_graph``); the scheduler ships
only the file it was given.
"""

from __future__ import annotations

PIXELS = "pixels"  # the uint8 entry's input: [N, S, S, 3], RGB, 0..255, resized and centre-cropped
UINT8 = "uint8"  # the entry's kind, as items and replies name it
SUFFIX = "-uint8"
PREPROCESSING = ("uint8 RGB pixels [N, S, S, 3] (resized so the short side is 256/224 S, centre-cropped), "
                 "cast, /255, ImageNet mean and std, to NCHW: in the graph, on the model's device")  # fmt: skip


def image_size(inputs: list[dict]) -> int | None:
    """S when the model's only input is a float32 [N, 3, S, S] image, else None."""
    if len(inputs) != 1:
        return None
    t = inputs[0]
    shape = list(t["shape"])
    if t["dtype"] != "float32" or len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] <= 0:
        return None
    return shape[2]


def uint8_entry(model: dict) -> dict | None:
    """The ``-uint8`` name's metadata for a model (``ModelFile.describe()``'s form), or
    None when the model is not a float image classifier."""
    size = image_size(model["inputs"])
    if size is None:
        return None
    batch = model["inputs"][0]["shape"][0]
    return {
        "name": model["name"] + SUFFIX,
        "inputs": [{"name": PIXELS, "dtype": "uint8", "shape": [batch, size, size, 3]}],
        "outputs": [dict(o) for o in model["outputs"]],
    }
