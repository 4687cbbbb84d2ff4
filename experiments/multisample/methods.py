"""The training recipes the multi-sample studies compare, and the records each one trains on.

A `Method` is an objective family at a group size k with the weight of the NLL (SFT) term on
the chosen responses that the thesis adds to every method of §3.6.1 (footnote 3):

    dpo          DPO on one chosen / one rejected response (k = 1)         beta
    ipo          IPO on one pair (k = 1)                                   tau
    mdpo         mDPO on groups of k >= 2 (§3.5.1)                         beta
    mipo         mIPO with the unbiased estimator of Prop. 1 (k >= 2)      tau
    mipo_biased  the plain mIPO loss, without Prop. 1's variance correction
    nll_only     the NLL term alone: SFT on the chosen groups (a control: how much of a method's
                 effect the NLL term makes by itself)

Every method of a study reads the same nested groups: the records of group size k hold the
first k members of each chosen and rejected group (`records`), so the data of different k
and of the single-pair methods are paired.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from alignax.objectives import DPO, IPO, MDPO, MIPO, SFT, Objective

NAMES = ("dpo", "ipo", "mdpo", "mipo", "mipo_biased", "nll_only")
SINGLE = ("dpo", "ipo")  # pair objectives: one response per role
_DISPLAY = {"dpo": "DPO", "ipo": "IPO", "mdpo": "mDPO", "mipo": "mIPO",
            "mipo_biased": "mIPO (plain)", "nll_only": "NLL only"}


@dataclasses.dataclass(frozen=True)
class Method:
    """One recipe: objective family `name` at group size `k` with NLL weight `nll_weight`.

    Raises:
      ValueError: an unknown name, k != 1 for dpo / ipo, k < 2 for the group objectives, a
        negative NLL weight, or an NLL weight on nll_only (which is the NLL term alone).
    """

    name: str
    k: int
    nll_weight: float = 0.0

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"unknown method {self.name!r}; expected one of {NAMES}")
        if self.name in SINGLE and self.k != 1:
            raise ValueError(f"{self.name} compares single responses: k must be 1, got {self.k}")
        if self.name not in SINGLE and self.name != "nll_only" and self.k < 2:
            raise ValueError(f"{self.name} compares groups: k must be >= 2, got {self.k} (use "
                             f"{'dpo' if self.name == 'mdpo' else 'ipo'} for k = 1)")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.nll_weight >= 0.0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if self.name == "nll_only" and self.nll_weight != 0.0:
            raise ValueError("nll_only is the NLL term alone (SFT on the chosen groups); leave "
                             "its nll_weight at 0")

    @property
    def key(self) -> str:
        """A file-system name, e.g. "mdpo_k3_nll1" (run directories, JSON keys)."""
        if self.name == "nll_only":
            return f"nll_only_k{self.k}"
        return f"{self.name}_k{self.k}_nll{self.nll_weight:g}"

    @property
    def label(self) -> str:
        """A table label, e.g. "mDPO k=3, NLL 1" or "DPO, no NLL"."""
        if self.name == "nll_only":
            return f"NLL only (SFT on chosen, k={self.k})"
        size = "" if self.name in SINGLE else f" k={self.k}"
        nll = f"NLL {self.nll_weight:g}" if self.nll_weight else "no NLL"
        return f"{_DISPLAY[self.name]}{size}, {nll}"

    def objective(self, *, beta: float, tau: float) -> Objective:
        """The registered objective config of this method."""
        if self.name == "dpo":
            return DPO(beta=beta, nll_weight=self.nll_weight)
        if self.name == "ipo":
            return IPO(tau=tau, nll_weight=self.nll_weight)
        if self.name == "mdpo":
            return MDPO(beta=beta, nll_weight=self.nll_weight)  # §3.5.1
        if self.name in ("mipo", "mipo_biased"):
            return MIPO(tau=tau, unbiased=self.name == "mipo", nll_weight=self.nll_weight)
        return SFT()


def records(prompts: Sequence[str], chosen: Sequence[Sequence[str]],
            rejected: Sequence[Sequence[str]], method: Method) -> list[dict]:
    """The records `method` trains on: per prompt the first k chosen and rejected responses.

    Args:
      prompts: G prompt texts.
      chosen, rejected: G groups of response texts each (at least k per group).
      method: the recipe; dpo / ipo get the "standard" format ({"prompt", "chosen",
        "rejected"} strings), the others the "grouped" one (lists of k responses).
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} "
                         f"rejected groups: one group of each per prompt")
    k = method.k
    short = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if min(len(c), len(r)) < k]
    if short:
        raise ValueError(f"groups {short[:8]} hold fewer than k={k} responses")
    if method.name in SINGLE:
        return [{"prompt": p, "chosen": c[0], "rejected": r[0]}
                for p, c, r in zip(prompts, chosen, rejected)]
    return [{"prompt": p, "chosen": list(c[:k]), "rejected": list(r[:k])}
            for p, c, r in zip(prompts, chosen, rejected)]
