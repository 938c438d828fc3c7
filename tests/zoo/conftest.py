"""Fixtures the zoo tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def splits():
    """The scikit-learn digits split into train / calibration / test (seed 0)."""
    pytest.importorskip("sklearn")
    from calibration.digits import load_digits_splits

    return load_digits_splits(seed=0)
