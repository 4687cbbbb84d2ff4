"""The linear pessimism (gamma) annealing of 004 §4.1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.schedules import pessimism_schedule


def test_paper_defaults_linear_from_1e4_to_1e2():
    schedule = pessimism_schedule(10_000)
    steps = np.array([0, 2_500, 5_000, 10_000, 30_000])
    want = np.array([1e-4, 1e-4 + 0.25 * (1e-2 - 1e-4), 0.00505, 1e-2, 1e-2])
    np.testing.assert_allclose([schedule(s) for s in steps], want, rtol=1e-5)


def test_traced_step_under_jit_and_vmap():
    schedule = pessimism_schedule(100, init_value=0.0, end_value=1.0, transition_begin=10)
    got = jax.jit(jax.vmap(schedule))(jnp.array([0, 10, 60, 110, 500]))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(total_steps=0), dict(total_steps=-5),
                                    dict(total_steps=10, init_value=-1e-4),
                                    dict(total_steps=10, transition_begin=-1)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        pessimism_schedule(**kwargs)
