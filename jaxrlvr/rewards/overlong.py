"""DAPO's overlong reward shaping (Yu et al. 2025, "soft overlong punishment"), as verl's
DAPO reward manager applies it: a response longer than `max_len - buffer` tokens loses
`factor` times the fraction of the buffer it ran into, down to `-factor` at `max_len`.
"""

from __future__ import annotations

import numpy as np


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int, factor: float) -> np.ndarray:
    """`min(-(L - (max_len - buffer)) / buffer * factor, 0)` per response length `L`
    (float32 [N]); zeros when `buffer` is 0 (off)."""
    lengths = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros(lengths.shape, np.float32)
    exceed = lengths - (max_len - buffer)
    return np.minimum(-exceed / buffer * factor, 0.0).astype(np.float32)
