"""uint8 pixels -> model inputs, inside the jitted step.

A dataset stays on the device as uint8, a quarter of float32's bytes, and no
float copy of it ever exists: each step normalises only its own batch,

    x = p / 255 * input_scale,   then (x - mean) / std per channel if asked,

with the numbers passed as arrays (`input_numbers`), so a run with another
input scale reuses the compiled step.
"""

from __future__ import annotations

import numpy as np


def input_numbers(input_scale: float = 1.0, mean=None, std=None, dtype="float32") -> dict:
    """The numbers `normalize` takes, as arrays of the inputs' dtype."""
    numbers = {"scale": np.asarray(input_scale / 255.0, dtype)}
    if mean is not None:
        numbers.update(mean=np.asarray(mean, dtype), std=np.asarray(std, dtype))
    return numbers


def normalize(pixels, numbers: dict):
    """uint8 pixels -> float inputs: x = p / 255 * input_scale, then
    (x - mean) / std per channel if given."""
    x = pixels.astype(numbers["scale"].dtype) * numbers["scale"]
    if "mean" in numbers:
        x = (x - numbers["mean"]) / numbers["std"]
    return x


def channel_stats(images: np.ndarray, input_scale: float = 1.0):
    """Per-channel mean and std of the scaled training images (for --standardize)."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) * (input_scale / 255.0)
    return x.mean(0), x.std(0) + 1e-8
