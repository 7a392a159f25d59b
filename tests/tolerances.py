"""The float32 tolerances of the loss tests against hand-computed NumPy references."""

import numpy as np

RTOL = 1e-5
ATOL = 1e-6


def assert_close(a, b, rtol: float = RTOL, atol: float = ATOL) -> None:
    """`a` equals the reference `b` within `rtol`/`atol`, compared in float64."""
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)
