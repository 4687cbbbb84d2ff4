"""Hyper-parameter schedules: the serialisable dataclasses, optax callables, range checks, and
the linear pessimism (gamma) annealing of 004 §4.1. (Evaluated inside the train step:
tests/test_objective_contract.py::test_gamma_anneals_inside_the_step.)"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignax.schedules import (Constant, Cosine, Linear, check_hyper, from_config, is_constant,
                               pessimism_schedule, to_config, value_at)


def test_paper_defaults_linear_from_1e4_to_1e2():
    schedule = pessimism_schedule(10_000)
    assert schedule == Linear(1e-4, 1e-2, transition_steps=10_000)  # a serialisable schedule
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


def test_schedule_values_match_closed_forms():
    steps = jnp.arange(12)
    np.testing.assert_allclose(Constant(0.3)(steps), np.full(12, 0.3), rtol=1e-7)
    linear = np.clip(0.2 + (1.0 - 0.2) * (np.arange(12) - 2) / 8, None, 1.0)
    np.testing.assert_allclose(Linear(0.2, 1.0, transition_steps=8, transition_begin=2)(steps),
                               np.where(np.arange(12) < 2, 0.2, linear), rtol=1e-6)
    cosine = lambda a, b: b + (a - b) * 0.5 * (1 + np.cos(np.pi * np.minimum(np.arange(12), 8) / 8))  # noqa: E731
    np.testing.assert_allclose(Cosine(1.0, 0.1, decay_steps=8)(steps), cosine(1.0, 0.1),
                               rtol=1e-6)
    np.testing.assert_allclose(Cosine(0.0, 0.5, decay_steps=8)(steps), cosine(0.0, 0.5),
                               rtol=1e-6, atol=1e-7)  # rising from 0


@pytest.mark.parametrize("bad", [lambda: Linear(0.0, 1.0, transition_steps=0),
                                 lambda: Linear(0.0, float("nan"), transition_steps=3),
                                 lambda: Cosine(1.0, 0.0, decay_steps=2.5),
                                 lambda: Constant(float("inf"))])
def test_schedule_fields_are_validated(bad):
    with pytest.raises(ValueError):
        bad()


def test_configs_round_trip_through_json():
    for schedule in (Constant(0.5), Linear(0.0, 1.0, transition_steps=4, transition_begin=1),
                     Cosine(1.0, 0.0, decay_steps=3), 0.25):
        config = json.loads(json.dumps(to_config(schedule)))
        assert from_config(config) == schedule
    with pytest.raises(TypeError, match="cannot serialise"):
        to_config(optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="unknown schedule 'Step'"):
        from_config({"schedule": "Step", "value": 1.0})


def test_value_at_and_range_checks():
    assert value_at(0.1, jnp.int32(3)) == 0.1 and is_constant(0.1)  # numbers pass unchanged
    assert not is_constant(Constant(0.1)) and not is_constant(True)
    got = value_at(optax.linear_schedule(1.0, 0.0, 4), jnp.int32(2))
    assert got.dtype == jnp.float32 and float(got) == 0.5
    check_hyper("beta", Linear(0.5, 0.1, transition_steps=3), low=0.0)
    with pytest.raises(ValueError, match="beta must be > 0, got 0.0"):
        check_hyper("beta", Linear(0.5, 0.0, transition_steps=3), low=0.0)
    with pytest.raises(ValueError, match="lam must be >= 0, got -1.0 .the schedule's value at "
                                         "step 0"):
        check_hyper("lam", optax.constant_schedule(-1.0), low=0.0, inclusive=True)
    with pytest.raises(ValueError, match="must be in"):
        check_hyper("alpha", 1.0, low=0.0, high=1.0)
    with pytest.raises(TypeError, match="a number or a schedule"):
        check_hyper("beta", True, low=0.0)
