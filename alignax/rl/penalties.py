"""f-divergence penalties of PPO in the thesis' two placements, PPO(reward) and PPO(loss).

Convention (the same divergence as f-DPO's). The divergence named X regularises

    D_X(pi, pi_ref) = E_{y ~ pi_ref}[f_X(u)],   u = pi(y|x) / pi_ref(y|x),

with f_X the generator of Table 2.1 (`alignax.divergences`); `alignax.toy.bandit.
optimal_policy` maximises E_pi[r] - beta D_X(pi, pi_ref) and f-DPO's X has that optimum
(Theorem 1). PPO only sees samples of pi, under which

    D_X(pi, pi_ref) = E_{y ~ pi}[f_X(u) / u] = E_{y ~ pi}[g_X(t)],   t = 1/u = pi_ref / pi,

where g_X(t) = t f_X(1/t) is the conjugate generator (`Divergence.conjugate()`: reverse KL <->
forward KL, JS <-> JS, alpha <-> 1 - alpha). The thesis' formulas map onto this as follows:

| thesis | its notation | here |
|---|---|---|
| §2.6.1 PPO(reward) | r - beta f(pi/pi_ref) | r - beta f_X(u)/u (the per-sample term whose mean under pi is D_X) |
| §2.8.1 | r_RKL = r + beta log t, r_JS = r - beta (t log t - (t+1) log((t+1)/2)), r_FKL = r - beta t log t | r - beta g_X(t): g = -log t, the JS generator, t log t |
| §2.6.1 PPO(loss) | beta D_f(pi_ref, pi), D_f(p, q) = E_q[f(p/q)] | with f = g_X: E_pi[g_X(t)] = D_X(pi, pi_ref) |
| §2.8.2 | E_q[f(r) - f'(1)(r - 1)], r = p/q | p = pi, q = pi_ref, r = u (`Divergence.estimator`) |

So "forward KL" is KL(pi_ref || pi) and "reverse KL" is KL(pi || pi_ref) everywhere in alignax.

Penalty placements (`PenaltyConfig.placement`):

- "reward", PPO(reward): the reward becomes r - beta phi(h), h = log u of the rollout policy
  (data, no gradient). `reward_penalty="f_over_u"` (default, the thesis) takes
  phi = f_X(u)/u, whose mean is D_X. As a frozen reward, though, its policy gradient
  E_pi[phi grad log pi] misses the term E_pi[grad phi], which vanishes only for reverse KL; the
  fixed point of PPO is then r - beta f_X(u)/u = const instead of the optimum's KKT condition
  r - beta f_X'(u) = lambda (§2.5), and where d phi / d pi < 0 (t > 1 for JS and alpha,
  t > 1/e for forward KL) a response whose probability falls is penalised more, so it falls
  further (§2.8.1's instability, measured in `tests/test_rl_bandit.py`).
  `reward_penalty="f_prime"` takes phi = f_X'(u) - f_X'(1), the per-sample reward whose
  score-function gradient E_pi[phi grad log pi] = grad D_X exactly: its fixed point is the
  optimum for every divergence. Both are h for reverse KL (the usual per-token KL penalty).
- "loss", PPO(loss): the reward is r alone, and beta times the §2.8.2 estimator of D_X is a
  separate differentiable loss term. Samples come from the rollout policy pi_old, so the term
  is importance-weighted: D_X = E_{pi_old}[(pi_ref/pi_old) f_X(u)], and with the control
  variate, per sample (pi_ref/pi_old) [f_X(u) - f_X'(1)(u - 1)]. The weight pi_ref/pi_old is a
  constant, so at pi = pi_old the value is the §2.8.2 estimator from samples of pi,
  g(t) - g'(1)(t - 1), and the gradient, (pi/pi_old)(f_X'(u) - f_X'(1)) grad log pi, is
  unbiased for grad D_X on every minibatch epoch (differentiating the plain estimator with
  the samples held fixed would instead give the gradient of another divergence: for reverse
  KL, that of forward KL).

Levels (`PenaltyConfig.level`): "sequence" applies the penalty to the response's log-ratio
h = sum_t h_t (the divergence between response distributions, exactly f-DPO's);
"token" applies it to each token's h_t and sums over the response, which estimates
sum_t E[D_X(pi(.|s_t), pi_ref(.|s_t))] over the visited prefixes s_t, equal to the sequence
divergence for reverse KL (chain rule) and lower in variance. On one-token responses (the
finite-response toy) both coincide.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from alignax._checks import as_float32
from alignax.divergences import Divergence, f_divergence_estimator, get_divergence

PLACEMENTS = ("reward", "loss")
LEVELS = ("token", "sequence")
REWARD_PENALTIES = ("f_over_u", "f_prime")
_MAX_LOG_WEIGHT = 20.0  # |log pi/pi_old| cap of PPO(loss)'s importance weight (`loss_penalty`)
_CENTRED = ("jsd", "alpha")  # f'(1) = 0 in Table 2.1, so g'(1) = -f'(1) = 0 as well
_MIN_LOG_RATIO = -60.0  # lowest log pi/pi_ref the divergence term reads (`loss_penalty`)


@dataclasses.dataclass(frozen=True)
class PenaltyConfig:
    """Which divergence PPO penalises, and where.

    Attributes:
      divergence: "reverse_kl", "forward_kl", "jsd" or "alpha" (admissible, Table 2.1).
      alpha: in (0, 1), only with divergence="alpha".
      placement: "reward" (PPO(reward)) or "loss" (PPO(loss)).
      level: "token" or "sequence" (module docstring).
      reward_penalty: with placement="reward": "f_over_u" (the thesis' f(u)/u) or "f_prime"
        (f'(u) - f'(1), whose PPO fixed point is the regularised optimum).
    """

    divergence: str = "reverse_kl"
    alpha: float | None = None
    placement: str = "reward"
    level: str = "token"
    reward_penalty: str = "f_over_u"

    def __post_init__(self):
        get_divergence(self.divergence, alpha=self.alpha)  # raises on a bad name / alpha
        for name, value, allowed in (("placement", self.placement, PLACEMENTS),
                                     ("level", self.level, LEVELS),
                                     ("reward_penalty", self.reward_penalty, REWARD_PENALTIES)):
            if value not in allowed:
                raise ValueError(f"PenaltyConfig.{name} must be one of {allowed}, got {value!r}")

    @property
    def div(self) -> Divergence:
        return get_divergence(self.divergence, alpha=self.alpha)


def reward_penalty(config: PenaltyConfig, log_ratio: jax.Array) -> jax.Array:
    """phi(h) of PPO(reward), elementwise: the reward is r - beta phi.

    Args:
      config: the penalty.
      log_ratio: any shape, h = log pi_old - log pi_ref of the sampled tokens or responses.

    Returns:
      Same shape, float32: f(u)/u = g(e^-h) ("f_over_u") or f'(u) - f'(1) ("f_prime").

    Examples:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([-1.0, 0.0, 2.0])
      >>> reward_penalty(PenaltyConfig("reverse_kl"), h)  # log u: the usual KL penalty
      Array([-1.,  0.,  2.], dtype=float32)
      >>> reward_penalty(PenaltyConfig("forward_kl"), h)  # t log t, t = e^-h (§2.8.1 r_FKL)
      Array([ 2.7182817 , -0.        , -0.27067056], dtype=float32)
    """
    h = as_float32(log_ratio)
    div = config.div
    if config.reward_penalty == "f_prime":
        return div.f_prime_difference(h, jnp.zeros_like(h))  # f'(u) - f'(1), exact near h = 0
    if config.divergence in _CENTRED:  # g'(1) = 0: g(t) is its own §2.8.2 estimator, which is
        return divergence_estimate(config, h)  # evaluated without cancellation at any t
    return div.conjugate().f(-h)  # g(t) = f(u)/u at log t = -h: -h e^-h or h


def loss_penalty(config: PenaltyConfig, logps: jax.Array, old_logps: jax.Array,
                 ref_logps: jax.Array) -> jax.Array:
    """Per-sample terms of PPO(loss)'s divergence loss; their mean estimates D_X(pi, pi_ref).

    (pi_ref/pi_old) [f(u) - f'(1)(u - 1)] with u = pi/pi_ref (module docstring), computed in the
    equal form (pi/pi_old) [g(t) - g'(1)(t - 1)], t = 1/u, whose factors stay moderate where PPO
    operates (pi/pi_old near 1): unbiased in value and gradient for samples drawn from pi_old,
    for any current pi. For finite values and gradients at any input, log(pi/pi_old) is clipped
    to +/-20 (as in `alignax.rl.losses.clipped_surrogate`) and h = log u raised to -60 at least:
    a sample 1e26 times less likely under pi than under pi_ref has probability below 1e-26
    under pi.

    Args:
      config: the penalty (its divergence).
      logps: log pi of the samples under the current policy (differentiated), any shape.
      old_logps, ref_logps: log pi_old (the rollout policy) and log pi_ref, same shape.

    Returns:
      Same shape, float32, every term >= 0; the gradient w.r.t. logps is
      (pi/pi_old)(f'(u) - f'(1)).
    """
    logps, old_logps, ref_logps = (as_float32(x) for x in (logps, old_logps, ref_logps))
    weight = jnp.exp(jnp.clip(logps - old_logps, -_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))
    return weight * divergence_estimate(config, jnp.maximum(logps - ref_logps, _MIN_LOG_RATIO))


def divergence_estimate(config: PenaltyConfig, log_ratio: jax.Array) -> jax.Array:
    """§2.8.2 terms g(t) - g'(1)(t - 1), t = e^-h, from samples of pi: mean = D_X(pi, pi_ref).

    The metric (and the adaptive controller's input); for reverse KL these are Schulman's k3.
    Shapes: elementwise, float32, >= 0.
    """
    return f_divergence_estimator(config.divergence, log_ratio, alpha=config.alpha,
                                  sampled_from="p")
