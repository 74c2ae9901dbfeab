"""Kernel tests compare against f32 references: keep XLA's f32 matmuls exact (on a GPU XLA would
otherwise use TF32 for the reference, on CPU this changes nothing)."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _exact_f32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield
