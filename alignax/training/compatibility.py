"""An objective against a model, a dataset and a batch: checked before anything compiles.

`check_compatible(objective, model=..., data=...)` is the one check a trainer runs after
building the model and preparing the data; `make_train_step` runs its model half, and the step
checks every batch on entry (`check_batch`, cached per shape signature). Each failure is a
ValueError (TypeError for a model that is no known kind) that names the objective, the
column, and the fix, e.g.

    mipo needs grouped data: records with lists of chosen/rejected responses (format
    'grouped'); this dataset is 'standard': 'chosen_input_ids' is [B, T], not grouped [B, K, T]

Batch layout (`alignax.data.batching`): every column leads with the batch axis B.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models import CausalLM, RewardEnsemble, RewardModel
from alignax.objectives.registry import CAUSAL_LM, REWARD_MODEL, Objective

PACKED_ROWS = ("packed_input_ids", "packed_attention_mask", "packed_positions",
               "packed_segment_ids")  # [B, L]
PACKED_SCORES = ("packed_score_index", "packed_score_targets", "packed_score_mask")  # [B, M, R]
_INTEGER, _MASK, _FLOAT = "an integer", "a bool or integer", "a floating"


def model_kind(model: Any) -> str:
    """CAUSAL_LM or REWARD_MODEL for a model, its class or its `nnx.GraphDef`.

    Raises:
      TypeError: neither a CausalLM nor a RewardModel / RewardEnsemble.
    """
    if isinstance(model, nnx.GraphDef):
        cls = model.nodes[0].type  # the root node: the model's class
    else:
        cls = model if isinstance(model, type) else type(model)
    if issubclass(cls, CausalLM):
        return CAUSAL_LM
    if issubclass(cls, (RewardModel, RewardEnsemble)):
        return REWARD_MODEL
    raise TypeError(f"cannot train {cls.__name__}: expected an alignax CausalLM (policy) or a "
                    "RewardModel / RewardEnsemble (reward model)")


def check_model(objective: Objective, model: Any) -> None:
    """Refuses a reward-model objective on a causal LM and a policy objective on a reward model."""
    kind = model_kind(model)
    if kind == objective.needs.model:
        return
    cls = model.nodes[0].type if isinstance(model, nnx.GraphDef) else (
        model if isinstance(model, type) else type(model))
    if objective.needs.model == REWARD_MODEL:
        raise ValueError(
            f"{objective.name} trains a reward model on its scalar scores, but the model is a "
            f"causal LM ({cls.__name__}): build one with alignax.models.create_reward_model or "
            "load_reward_model, or train the policy with a log-prob objective (e.g. dpo)")
    raise ValueError(
        f"{objective.name} trains a causal LM policy on its response log-probs, but the model "
        f"is a reward model ({cls.__name__}): load a causal LM (alignax.models.from_pretrained), "
        "or train the reward model with bradley_terry or causal_reward")


def _shape(shape) -> str:
    return f"({', '.join(map(str, shape))})"


def check_batch(objective: Objective, columns: Mapping[str, tuple[tuple[int, ...], Any]], *,
                share_prompt: bool = False, cached_reference: bool = False,
                source: str = "the batch") -> tuple[str, ...]:
    """Checks the columns `objective` reads: presence, rank, leading size B and dtype.

    Args:
      objective: a registered objective config.
      columns: column name -> (shape, dtype) of a batch (or of one collated example).
      share_prompt: the roles are scored from the packed shared-prompt rows.
      cached_reference: the reference log-probs come as f"{role}_reference_logps" columns.
      source: how messages name the data ("the batch", "this dataset is 'standard'").

    Returns:
      The names of the columns the train step reads (the rest of the batch is not sent).

    Raises:
      ValueError: naming the objective, the offending column and the fix.
    """
    needs, name = objective.needs, objective.name
    roles_present = sorted(k[:-len("_loss_mask")] for k in columns if k.endswith("_loss_mask"))
    read: list[str] = []
    batch_size: list[int] = []  # B, from the first column read

    def fail(problem: str) -> ValueError:
        return ValueError(f"{name}: {problem}")

    def refuse(predicate: str) -> ValueError:  # "<name> needs ..." / "<name> takes ..."
        return ValueError(f"{name} {predicate}")

    def wrong_data(problem: str) -> ValueError:
        return ValueError(f"{name} needs {needs.data_phrase()}; {source}{problem}")

    def column(key: str, kind: str, ranks: tuple[int, ...], what: str):
        if key not in columns:
            raise fail(f"the column {key!r} ({what}) is missing from {source}")
        shape, dtype = tuple(columns[key][0]), jnp.dtype(columns[key][1])
        ok_dtype = (jnp.issubdtype(dtype, jnp.integer) if kind == _INTEGER
                    else jnp.issubdtype(dtype, jnp.floating) if kind == _FLOAT
                    else jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_)
        if not ok_dtype:
            raise fail(f"column {key!r} must have {kind} dtype, got {dtype} ({source})")
        if len(shape) not in ranks:
            raise fail(f"column {key!r} ({what}) must have rank {' or '.join(map(str, ranks))}"
                       f", got shape {_shape(shape)} ({source})")
        if not batch_size:
            batch_size.append(shape[0])
        elif shape[0] != batch_size[0]:
            raise fail(f"column {key!r} has leading size {shape[0]}, but the batch size B is "
                       f"{batch_size[0]} (every column leads with B; {source})")
        read.append(key)
        return shape

    def same_shape(key: str, shape, kind: str, what: str, like: str) -> None:
        got = column(key, kind, (len(shape),), what)
        if got != shape:
            raise fail(f"column {key!r} ({what}) has shape {_shape(got)}, expected "
                       f"{_shape(shape)} to match {like!r} ({source})")

    for role in needs.roles:
        lead = f"{role}_loss_mask" if share_prompt else f"{role}_input_ids"
        if lead not in columns:
            raise wrong_data(f", with response roles {roles_present or 'none'} (no column "
                             f"{lead!r})")
        rank = len(columns[lead][0])
        if needs.grouped is True and rank == 2:
            raise wrong_data(f": {lead!r} is [B, T] {_shape(columns[lead][0])}, not grouped "
                             "[B, K, T]")
        if needs.grouped is False and rank == 3:
            raise wrong_data(f": {lead!r} is grouped [B, K, T] {_shape(columns[lead][0])}; "
                             "use mdpo or mipo for groups")
        ranks = {True: (3,), False: (2,), None: (2, 3)}[needs.grouped]
        what = "[B, K, T]" if ranks == (3,) else "[B, T] or [B, K, T]" if len(ranks) == 2 else "[B, T]"
        if share_prompt:
            shape = column(lead, _MASK, ranks, f"{role}'s response tokens, {what}")
        else:
            shape = column(lead, _INTEGER, ranks, f"{role} token ids, {what}")
            same_shape(f"{role}_loss_mask", shape, _MASK, "response-token mask", lead)
        same_shape(f"{role}_attention_mask", shape, _MASK, "attention mask", lead)
        if len(shape) == 3:
            same_shape(f"{role}_group_mask", shape[:2], _MASK, "existing group members [B, K]",
                       lead)
        if cached_reference and needs.reference:
            same_shape(f"{role}_reference_logps", shape[:-1], _FLOAT,
                       "cached reference log-probs (alignax.training.reference)", lead)

    if share_prompt:
        if "packed_input_ids" not in columns:
            raise fail(f"share_prompt needs the packed columns {PACKED_ROWS + PACKED_SCORES}: "
                       f"collate the batch with share_prompt=True "
                       f"(PreferenceDataset.batches(share_prompt=True)); {source} has none")
        rows = column("packed_input_ids", _INTEGER, (2,), "packed rows [B, L]")
        for key in PACKED_ROWS[1:]:
            same_shape(key, rows, _MASK if key == "packed_attention_mask" else _INTEGER,
                       "packed rows [B, L]", "packed_input_ids")
        scores = column("packed_score_index", _INTEGER, (3,), "[B, M, R]")
        same_shape("packed_score_targets", scores, _INTEGER, "[B, M, R]", "packed_score_index")
        same_shape("packed_score_mask", scores, _MASK, "[B, M, R]", "packed_score_index")
        # the packed rows hold every role's responses: their loss masks give the layout
        for role in roles_present:
            if f"{role}_loss_mask" not in read:
                column(f"{role}_loss_mask", _MASK, (2, 3), "response-token mask")

    if needs.bins:
        for role in needs.roles:
            key = f"{role}_bin" if f"{role}_bin" in columns else "bin"
            if key not in columns:
                raise refuse(f"needs the bin of a spurious attribute per record ('bin') or per "
                             f"response ({', '.join(repr(f'{r}_bin') for r in needs.roles)}); "
                             f"{source}, with neither: prepare the data with bin_column= or "
                             "bin_fn=")
            if key not in read:
                column(key, _INTEGER, (1,), "bins [B]")

    if needs.target_rewards:
        for key in ("target_rewards_1", "target_rewards_2"):
            if key not in columns:
                raise refuse(f"needs the target rewards 'target_rewards_1' / 'target_rewards_2' "
                             f"of a reward model (or ensemble) for each pair; {source}, "
                             f"without {key!r}: label the pairs first "
                             "(prepare_dataset(reward_columns=...))")
        shape = column("target_rewards_1", _FLOAT, (1, 2), "target rewards, [B] or [B, E]")
        if len(shape) == 2 and not needs.ensemble:
            raise refuse(f"takes one target reward per response ([B]); 'target_rewards_1' "
                         f"holds an ensemble of E = {shape[1]} {_shape(shape)} ({source}): use "
                         "pessimistic_distill (e-DPO) for an ensemble")
        same_shape("target_rewards_2", shape, _FLOAT, "target rewards", "target_rewards_1")
    return tuple(read)


def check_data(objective: Objective, data: Any, *, share_prompt: bool = False) -> None:
    """Checks a PreferenceDataset (its format, and the columns one collated example has) or
    a batch dict against what `objective` needs, and its per-record and per-response bins
    against `num_bins`.

    Raises:
      ValueError: naming the objective, the data's format or column, and the fix.
    """
    if isinstance(data, Mapping):
        columns = {k: (np.shape(v), v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype)
                   for k, v in data.items()}
        source = "the batch"
        bins = [np.ravel(v) for k, v in data.items() if k == "bin" or k.endswith("_bin")]
    else:
        sample = data.collate(data.examples[:1], share_prompt=share_prompt)
        columns = {k: (v.shape, v.dtype) for k, v in sample.items()}
        source = f"this dataset is {data.format!r}"
        bins = [np.asarray([ex.bin for ex in data.examples if ex.bin is not None]),
                np.asarray([b for ex in data.examples for role_bins in ex.response_bins.values()
                            for b in role_bins], dtype=np.int64)]  # per response, -1 = absent
    check_batch(objective, columns, share_prompt=share_prompt, source=source)
    num_bins = getattr(objective, "num_bins", None)
    largest = max((int(b.max()) for b in bins if b.size), default=None)
    if objective.needs.bins and largest is not None and largest >= num_bins:
        raise ValueError(f"{objective.name}: the data has bin {largest}, but num_bins = "
                         f"{num_bins} (bins are ints in [0, num_bins)): raise num_bins or "
                         "re-bin the data")


def check_compatible(objective: Objective, *, model: Any = None, data: Any = None,
                     share_prompt: bool = False) -> None:
    """Checks `objective` against a model (instance, class or GraphDef) and/or data (a
    PreferenceDataset or a batch dict) before anything is compiled; see the module docstring.

    Raises:
      ValueError / TypeError: the first mismatch, with the fix named.
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a registered objective config (e.g. "
                        f"alignax.objectives.DPO(beta=0.1)), got {type(objective).__name__}")
    if model is not None:
        check_model(objective, model)
    if data is not None:
        check_data(objective, data, share_prompt=share_prompt)
