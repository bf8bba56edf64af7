"""Tiny synthetic world shared by the data tests (written once per session)."""

import pytest

from larvseg_jax.data import synthetic

TINY = {"seed": 0, "image_size": 32, "num_seg": 24, "num_weak": 24, "num_single": 16, "num_eval": 4}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> str:
    return synthetic.ensure_synthetic(str(tmp_path_factory.mktemp("tiny_world")), TINY)
