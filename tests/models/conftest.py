"""Fixtures shared by the model tests."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def golden_g(goldens_dir):
    return dict(np.load(goldens_dir / "g_vit_npz.npz"))
