"""The objective contract: one registry of objective configs and the typed inputs they receive.

An objective is a frozen dataclass holding only its own hyper-parameters, validated when it is
built, registered by name with `@register`, declaring what it needs (`Needs`, see
`alignax.objectives.requirements`) and computing per-example losses from typed scores:

    @register("ipo")
    @dataclasses.dataclass(frozen=True)
    class IPO(Objective):
        tau: Hyper = 0.1
        needs: ClassVar[Needs] = Needs(model="causal_lm", roles=PAIR_ROLES, formats=PAIR_FORMATS)

        def loss(self, x, hp):                   # hp["tau"]: the value at this step
            w, l = x.scores["chosen"], x.scores["rejected"]
            return ipo_loss(w.h, l.h, tau=hp["tau"]), {}

The train step (`alignax.training.step.make_train_step`) scores each role the objective names
ONCE (policy and reference log-probs, or a reward model's scores), forms the log-ratios
h = log pi_theta - log pi_ref, and hands them over as `ObjectiveInputs`; objectives never read
token columns and never re-derive log-ratios. The concrete objectives live at the end of their
family modules (`fdpo`, `multisample`, `causal`, `reward`, `distill`); importing
`alignax.objectives` registers all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp

from alignax import schedules

Metrics = dict[str, jax.Array]

CAUSAL_LM, REWARD_MODEL = "causal_lm", "reward_model"
PAIR_ROLES = ("chosen", "rejected")
UNLABELED_ROLES = ("response_1", "response_2")
PAIR_FORMATS = ("standard", "conversational", "hh")
GROUPED_FORMATS = ("grouped",)
UNLABELED_FORMATS = ("unlabeled",)


@dataclasses.dataclass(frozen=True)
class Needs:
    """What an objective needs from the model and the batch, checked before any compilation.

    Attributes:
      model: CAUSAL_LM (a policy scored by its response log-probs) or REWARD_MODEL (a reward
        model whose scalar scores are trained).
      roles: the response roles scored ("chosen"/"rejected", or "response_1"/"response_2").
      formats: the data formats (`alignax.data.records.FORMATS`) whose records supply it.
      grouped: True for groups of responses per role ([B, K] scores), False for one response
        per role, None for either.
      reference: whether the reference log-probs (a frozen model or a cached column) are used.
      bins: whether a spurious-attribute bin is read: f"{role}_bin" [B] per response when the
        batch has it, else the per-record "bin" [B].
      target_rewards: whether the "target_rewards_1" / "target_rewards_2" columns are read.
      ensemble: whether they may hold an ensemble, [B, E], besides one reward per response [B].
      batch_level: the loss holds a term defined on the whole (micro-)batch (an MMD, a min
        over an ensemble): with gradient accumulation it is computed per micro-batch, so the
        update differs from the full batch's.
    """

    model: str
    roles: tuple[str, ...]
    formats: tuple[str, ...]
    grouped: bool | None = False
    reference: bool = True
    bins: bool = False
    target_rewards: bool = False
    ensemble: bool = False
    batch_level: bool = False

    def data_phrase(self) -> str:
        """The data this objective trains on, in words (for error messages)."""
        if self.roles == UNLABELED_ROLES:
            return ("unlabeled pairs: records with response_1/response_2 and target rewards "
                    f"(format {self.formats[0]!r})")
        if self.grouped:
            return ("grouped data: records with lists of chosen/rejected responses "
                    f"(format {self.formats[0]!r})")
        if self.grouped is None:
            return f"chosen responses (formats {', '.join(map(repr, self.formats))})"
        return ("preference pairs: one chosen and one rejected response per record (formats "
                f"{', '.join(map(repr, self.formats))})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scores:
    """One role's scores, computed once by the train step.

    Attributes:
      policy: [B] (grouped: [B, K]) float32, the summed response-token log-probs
        log pi_theta(y|x); for a reward model under training, its scores [B] ([B, E] with E
        heads, [B, M] / [B, M, E] for an ensemble of M).
      reference: log pi_ref(y|x), shaped like `policy`; None for objectives without a reference.
      h: policy - reference, the log-ratio every preference loss takes; None without reference.
      num_tokens: [B] ([B, K]) float32, scored response tokens per sequence.
      group_mask: [B, K] bool, the existing members of a grouped role; None for one response.
    """

    policy: jax.Array
    reference: jax.Array | None
    h: jax.Array | None
    num_tokens: jax.Array
    group_mask: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObjectiveInputs:
    """Everything an objective sees of one (micro-)batch.

    Attributes:
      scores: role -> `Scores` for each role in `Needs.roles`.
      columns: the side columns the objective declared, each leading with the batch axis:
        "bin" / f"{role}_bin" [B] int32, "target_rewards_1" / "target_rewards_2" [B] or [B, E].
      step: [] int32, the update count (schedules are evaluated at it).
      key: PRNG key of this (micro-)step, for stochastic objectives.
    """

    scores: dict[str, Scores]
    columns: dict[str, jax.Array]
    step: jax.Array
    key: jax.Array | None = None

    def bins(self, role: str) -> jax.Array:
        """[B] int bins of `role`'s responses: f"{role}_bin" when the batch has per-response
        bins, else the per-record "bin" (the same bin for both responses of a pair)."""
        name = f"{role}_bin"
        return self.columns[name] if name in self.columns else self.columns["bin"]


class Objective:
    """Base class of the registered objective configs (frozen dataclasses).

    Subclasses set `needs` (a `Needs`), list their float hyper-parameters that may be schedules
    in `hyper_parameters`, and implement `loss(inputs, hp) -> (loss [B], metrics)` with `hp`
    the hyper-parameters' values at this step. A subclass that lists "nll_weight" among them
    gets nll_weight times the NLL/SFT term of the chosen responses added to its loss (thesis
    ch. 3, footnote 3), unless the weight is the constant 0.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[Any]
    hyper_parameters: ClassVar[tuple[str, ...]] = ()

    def loss(self, x: ObjectiveInputs, hp: Mapping[str, Any]) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError

    def __call__(self, x: ObjectiveInputs) -> tuple[jax.Array, Metrics]:
        """Per-example float32 losses [B] (the step takes the mean) and scalar metrics."""
        hp = {name: schedules.value_at(getattr(self, name), x.step)
              for name in self.hyper_parameters}
        loss, metrics = self.loss(x, hp)
        if "nll_weight" in hp and not (schedules.is_constant(self.nll_weight)
                                       and self.nll_weight == 0.0):
            nll = chosen_nll(x.scores["chosen"])
            loss = loss + hp["nll_weight"] * nll
            metrics = {**metrics, "nll": jnp.mean(nll)}
        scheduled = {f"hyper/{n}": hp[n] for n in self.hyper_parameters
                     if not schedules.is_constant(getattr(self, n))}
        return loss, {**metrics, **scheduled}


def chosen_nll(chosen: Scores) -> jax.Array:
    """[B] mean over response tokens of -log pi(y_w,t); grouped: averaged over the members."""
    nll = -chosen.policy / jnp.maximum(chosen.num_tokens, 1.0)  # [B] or [B, K]
    if chosen.group_mask is None:
        return nll
    return group_mean(nll, chosen.group_mask)


def group_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, K] -> [B] mean over the valid members (0 with no gradient for an empty group)."""
    mask = jnp.asarray(mask).astype(bool)
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)


def pair_metrics(chosen: jax.Array, rejected: jax.Array, scale: Any = 1.0) -> Metrics:
    """TRL-style reward metrics of a pair batch: scale * chosen / rejected values ([B] each)."""
    chosen, rejected = scale * chosen, scale * rejected
    return {"rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
            "rewards/margins": jnp.mean(chosen - rejected),
            "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32))}


def check_hyper(objective: Objective, name: str, *, low: float, inclusive: bool = False,
                high: float | None = None) -> None:
    """`alignax.schedules.check_hyper` with the objective's name in the message."""
    try:
        schedules.check_hyper(name, getattr(objective, name), low=low, inclusive=inclusive,
                              high=high)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{objective.name}: {error}") from None


OBJECTIVES: dict[str, type[Objective]] = {}
"""Objective name -> config class; filled by `register` when the family modules are imported."""


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: registers an objective config class under `name` (sets `cls.name`)."""

    def decorate(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered "
                             f"({OBJECTIVES[name].__qualname__})")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return decorate


def _fields(cls: type[Objective]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def get_objective(name: str, **hyper_parameters) -> Objective:
    """The objective registered as `name`, built from its hyper-parameters.

    >>> get_objective("ipo", tau=0.5)
    IPO(tau=0.5, length_normalized=False, nll_weight=0.0)

    Raises:
      ValueError: an unknown name (the known ones are listed), a hyper-parameter the objective
        does not have (its own are listed), or an invalid value.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    unknown = sorted(set(hyper_parameters) - set(_fields(cls)))
    if unknown:
        raise ValueError(f"{name} has no hyper-parameter {', '.join(map(repr, unknown))}; its "
                         f"hyper-parameters are {_fields(cls)}")
    return cls(**hyper_parameters)


def objective_to_config(objective: Objective) -> dict[str, Any]:
    """A JSON-able dict {"name": ..., **hyper-parameters} (schedules as `schedules.to_config`)."""
    out: dict[str, Any] = {"name": objective.name}
    for field in _fields(type(objective)):
        value = getattr(objective, field)
        out[field] = list(value) if isinstance(value, tuple) else schedules.to_config(value)
    return out


def objective_from_config(config: Mapping[str, Any]) -> Objective:
    """Inverse of `objective_to_config`.

    >>> objective_from_config({"name": "dpo", "beta": 0.2})
    DPO(beta=0.2, nll_weight=0.0)
    """
    if "name" not in config:
        raise ValueError(f"an objective config needs a 'name' (one of {sorted(OBJECTIVES)}), "
                         f"got keys {sorted(config)}")
    fields = {k: schedules.from_config(v) for k, v in config.items() if k != "name"}
    if isinstance(fields.get("bandwidth"), list):
        fields["bandwidth"] = tuple(fields["bandwidth"])
    return get_objective(config["name"], **fields)
