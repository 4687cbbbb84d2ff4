"""alignax.eval on a tiny Llama: sampling layout, log-probs, scores, divergence and entropy
estimates against exact values from enumerating every response, and no recompilation.

Two compiled shapes serve every test: [8, 6] prompts with 5 new tokens (layout, greedy,
log-probs, scores) and [64, 4] prompts with 2 new tokens over a 16-token vocabulary (the exact
enumeration of all 256 responses).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from flax import nnx

import alignax.eval as ev
from alignax.eval.sampling import _sequence_logprobs
from alignax.models import RewardEnsemble, create, create_reward_model, generate, tiny_config
from alignax.models.generate import _generate
from alignax.training.mesh import make_mesh

VOCAB = 16
EOS = 3


def sharpened(seed: int, scale: float, mesh=None):
    """A tiny Llama over 16 tokens with every parameter scaled by `scale`: sharper next-token
    distributions than the near-uniform ones of a 0.02-std initialisation."""
    model = create(tiny_config("llama", vocab_size=VOCAB), rngs=nnx.Rngs(seed), mesh=mesh)
    nnx.update(model, jax.tree.map(lambda p: p * scale, nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="module")
def models():
    # Scale 2: KL(pi || pi_ref) of 0.6-0.8 nats over 2 tokens, entropies of 5.0-5.1 nats
    # (uniform: 5.5).
    return sharpened(0, 2.0), sharpened(1, 2.0)


def prompts(seed: int, count: int, width: int = 6):
    """Left-padded prompts [count, width] with 1..width real tokens in 4..15 (pad 0)."""
    rng = np.random.default_rng(seed)
    real = 1 + np.arange(count) % width
    mask = np.arange(width)[None, :] >= width - real[:, None]
    return np.where(mask, rng.integers(4, VOCAB, (count, width)), 0).astype(np.int32), mask


CONFIG = ev.SamplingConfig(num_samples=3, max_new_tokens=5, eos_token_id=EOS, pad_token_id=0,
                           batch_size=8, prompt_length=6)


@pytest.fixture(scope="module")
def drawn(models):
    ids, mask = prompts(0, 5, width=4)  # padded up to prompt_length 6 by `sample`
    return ids, mask, ev.sample(models[0], ids, mask, key=jax.random.key(0), config=CONFIG)


def test_sample_layout(drawn):
    ids, mask, samples = drawn
    assert samples.tokens.shape == samples.mask.shape == (5, 3, 5)
    assert samples.prompt_ids.shape == (5, 6) and samples.logprobs.shape == (5, 3)
    np.testing.assert_array_equal(samples.prompt_ids[:, 2:], ids)  # left-padded, order kept
    np.testing.assert_array_equal(samples.prompt_mask[:, 2:], mask)
    assert not samples.prompt_mask[:, :2].any()
    # after EOS: mask off and pad written; every response has at least one token
    lengths = samples.lengths
    assert (lengths >= 1).all()
    for p, k in itertools.product(range(5), range(3)):
        n = lengths[p, k]
        assert samples.mask[p, k, :n].all() and not samples.mask[p, k, n:].any()
        assert (samples.tokens[p, k, n:] == 0).all()
        assert EOS not in samples.tokens[p, k, :n - 1]
        assert n == 5 or samples.tokens[p, k, n - 1] == EOS
    # 15 rows in batches of 8: the draws differ between samples of one prompt
    assert len({tuple(r) for r in samples.tokens.reshape(15, 5).tolist()}) > 5


def test_wider_right_padded_prompts_are_repacked(models, drawn):
    ids, mask, samples = drawn
    real = [row[m] for row, m in zip(ids, mask)]
    wide = np.zeros((5, 9), np.int32)  # right-padded, wider than prompt_length = 6
    for i, r in enumerate(real):
        wide[i, :len(r)] = r
    again = ev.sample(models[0], wide, wide > 0, key=jax.random.key(0), config=CONFIG)
    np.testing.assert_array_equal(again.prompt_ids, samples.prompt_ids)
    np.testing.assert_array_equal(again.tokens, samples.tokens)  # same rows, same key


def test_greedy_samples_equal_generate(models):
    ids, mask = prompts(1, 8)
    config = ev.SamplingConfig(num_samples=1, max_new_tokens=5, temperature=0.0,
                               eos_token_id=EOS, batch_size=8, prompt_length=6)
    samples = ev.sample(models[0], ids, mask, key=jax.random.key(3), config=config)
    tokens, token_mask = generate(models[0], ids, mask, key=jax.random.key(9), max_new_tokens=5,
                                  temperature=0.0, eos_token_id=EOS)
    np.testing.assert_array_equal(samples.tokens[:, 0], tokens)
    np.testing.assert_array_equal(samples.mask[:, 0], token_mask)
    np.testing.assert_array_equal(samples.sampling_logprobs, 0.0)  # greedy: probability 1


def float64_logprobs(model, samples, temperature=1.0):
    """[P, K] float64 log-softmax(logits / T) of the response tokens, from the full logits."""
    seq = samples.sequences()
    logits = np.asarray(model(seq["input_ids"], seq["attention_mask"]), np.float64) / temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)  # [R, T, V]
    targets = seq["input_ids"][:, 1:]
    picked = np.take_along_axis(logp[:, :-1], targets[..., None], -1)[..., 0]  # [R, T - 1]
    total = np.sum(np.where(seq["loss_mask"][:, 1:], picked, 0.0), -1)
    return total.reshape(samples.tokens.shape[:2])


def test_logprobs_match_float64_reference(models, drawn):
    _, _, samples = drawn
    # float32 logits of this model are O(10): one rounding of 1e-6 per logit and per
    # log-sum-exp, summed over at most 5 tokens; both paths round independently.
    np.testing.assert_allclose(samples.logprobs, float64_logprobs(models[0], samples),
                               rtol=1e-5, atol=5e-5)
    np.testing.assert_array_equal(samples.sampling_logprobs, samples.logprobs)  # T = 1
    np.testing.assert_allclose(ev.response_logprobs(models[1], samples),
                               float64_logprobs(models[1], samples), rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(ev.response_logprobs(models[1], samples, temperature=0.7),
                               float64_logprobs(models[1], samples, 0.7), rtol=1e-5, atol=5e-5)


def test_tempered_sampling_logprobs(models):
    ids, mask = prompts(2, 8)
    config = ev.SamplingConfig(num_samples=1, max_new_tokens=5, temperature=1.6,
                               eos_token_id=EOS, batch_size=8, prompt_length=6)
    samples = ev.sample(models[0], ids, mask, key=jax.random.key(4), config=config)
    np.testing.assert_allclose(samples.logprobs, float64_logprobs(models[0], samples),
                               rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(samples.sampling_logprobs,
                               float64_logprobs(models[0], samples, 1.6), rtol=1e-5, atol=5e-5)
    with pytest.raises(ValueError, match="temperature=1"):
        ev.prompt_metrics(samples, reference_logprobs=samples.logprobs)


def test_sampling_on_a_mesh_matches_unsharded(models):
    sharded = sharpened(0, 2.0, mesh=make_mesh((2, 2, 2)))
    ids, mask = prompts(1, 8)
    config = dataclasses.replace(CONFIG, num_samples=2, temperature=0.0)
    plain, on_mesh = (ev.sample(m, ids, mask, key=jax.random.key(0), config=config)
                      for m in (models[0], sharded))
    np.testing.assert_array_equal(on_mesh.tokens, plain.tokens)
    np.testing.assert_array_equal(on_mesh.mask, plain.mask)
    # the same float32 computation with sharded reductions: rounding-level differences
    np.testing.assert_allclose(on_mesh.logprobs, plain.logprobs, rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(ev.response_logprobs(sharded, plain), plain.logprobs, rtol=1e-5,
                               atol=5e-5)


def test_no_recompilation_across_batches_policies_and_prompt_sets(models, drawn):
    before = _generate._cache_size(), _sequence_logprobs._cache_size()
    ids, mask = prompts(5, 7)  # another prompt count: 21 rows, 3 batches of 8
    for model, seed in ((models[0], 1), (models[1], 2)):
        samples = ev.sample(model, ids, mask, key=jax.random.key(seed), config=CONFIG)
        ev.response_logprobs(models[0], samples)
    assert (_generate._cache_size(), _sequence_logprobs._cache_size()) == before


def test_same_policy_as_reference_gives_zero_divergences(models, drawn):
    _, _, samples = drawn
    reference = ev.response_logprobs(models[0], samples)
    np.testing.assert_array_equal(reference, samples.logprobs)  # one compiled function
    out = ev.prompt_metrics(samples, reference_logprobs=reference,
                            divergences=("reverse_kl", "forward_kl", "jsd", ("alpha", 0.5)))
    for name in ("log_ratio", "divergence/reverse_kl", "divergence/forward_kl",
                 "divergence/jsd", "divergence/alpha_0.5"):
        np.testing.assert_array_equal(out[name], 0.0)


@pytest.fixture(scope="module")
def enumerated(models):
    """Samples of 2 prompts x 128 draws of 2 tokens (no EOS), and every one of the 256
    possible responses with its exact float64 log-probs under both models."""
    policy, reference = models
    ids, mask = prompts(3, 2, width=4)
    config = ev.SamplingConfig(num_samples=128, max_new_tokens=2, batch_size=64)
    samples = ev.sample(policy, ids, mask, key=jax.random.key(7), config=config)
    every = np.asarray(list(itertools.product(range(VOCAB), repeat=2)), np.int32)  # [256, 2]
    full = ev.Samples(samples.prompt_ids, samples.prompt_mask,
                      np.broadcast_to(every, (2, 256, 2)).copy(), np.ones((2, 256, 2), bool),
                      np.zeros((2, 256), np.float32), np.zeros((2, 256), np.float32), config)
    return samples, float64_logprobs(policy, full), float64_logprobs(reference, full)


def test_enumeration_is_a_distribution(enumerated):
    _, log_pi, log_ref = enumerated
    np.testing.assert_allclose(np.exp(log_pi).sum(-1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(np.exp(log_ref).sum(-1), 1.0, rtol=1e-9)


def test_divergences_and_entropy_against_exact_values(models, enumerated):
    """The per-prompt estimates are the means of the §2.8.2 terms at the sampled log-ratios;
    those terms' expectation under pi, summed over all 256 responses, is exactly
    D_f(pi, pi_ref) = sum_y pi_ref f(pi / pi_ref) (Table 2.1's f); and the samples come from pi:
    the mean log-ratio and -log pi lie within 5 standard errors of the exact KL and entropy
    (bounded variables on a finite support; the divergence terms themselves involve
    pi_ref / pi, whose tail is too heavy for a standard-error test at 128 samples)."""
    samples, log_pi, log_ref = enumerated
    reference = ev.response_logprobs(models[1], samples)
    divergences = ("reverse_kl", "forward_kl", "jsd", ("alpha", 0.3))
    out = ev.prompt_metrics(samples, reference_logprobs=reference, divergences=divergences,
                            diversity=False)
    u = np.exp(log_pi - log_ref)  # [2, 256] exact ratios
    f = {"reverse_kl": u * np.log(u), "forward_kl": -np.log(u),
         "jsd": u * np.log(u) - (u + 1) * np.log((u + 1) / 2),
         "alpha_0.3": (u ** 0.7 - 0.7 * u - 0.3) / (0.3 * -0.7)}  # Table 2.1

    def terms(h):  # estimators of the conjugates g(t) = t f(1/t) at t = pi_ref / pi
        t = np.exp(-h)
        return {"reverse_kl": h + t - 1, "forward_kl": -t * h - t + 1,
                "jsd": t * np.log(t) - (t + 1) * np.log((t + 1) / 2),
                "alpha_0.3": (t ** 0.3 - 0.3 * t - 0.7) / (0.7 * -0.3)}

    sampled = terms((samples.logprobs - reference).astype(np.float64))  # [2, 128] each
    everywhere = terms(log_pi - log_ref)  # [2, 256] each
    for label in f:
        exact = np.sum(np.exp(log_ref) * f[label], -1)  # [2]
        assert exact.min() > 0.1, (label, exact)  # a real divergence, not a vanishing one
        np.testing.assert_allclose(np.sum(np.exp(log_pi) * everywhere[label], -1), exact,
                                   rtol=1e-9)
        np.testing.assert_allclose(out[f"divergence/{label}"], sampled[label].mean(-1),
                                   rtol=2e-5, atol=1e-6)
    h = samples.logprobs - reference
    exact_kl = np.sum(np.exp(log_pi) * (log_pi - log_ref), -1)
    se = h.std(-1, ddof=1) / np.sqrt(128)
    assert np.all(np.abs(out["log_ratio"] - exact_kl) < 5 * se), (out["log_ratio"], exact_kl)
    exact_entropy = -np.sum(np.exp(log_pi) * log_pi, -1)
    se = samples.logprobs.std(-1, ddof=1) / np.sqrt(128)
    assert np.all(np.abs(out["entropy/sequence"] - exact_entropy) < 5 * se)
    np.testing.assert_allclose(out["entropy/token"], out["entropy/sequence"] / 2, rtol=1e-12)


def test_reward_scores_equal_direct_calls(drawn):
    _, _, samples = drawn
    config = tiny_config("llama", vocab_size=VOCAB)
    rm = create_reward_model(config, rngs=nnx.Rngs(2))
    ensemble = RewardEnsemble.create(config, num_members=2, rngs=nnx.Rngs(3))
    seq = samples.sequences()
    want = np.asarray(rm(seq["input_ids"], seq["attention_mask"])).reshape(5, 3)
    np.testing.assert_allclose(ev.reward_scores(rm, samples), want, rtol=1e-5, atol=1e-6)
    want = np.asarray(ensemble(seq["input_ids"], seq["attention_mask"])).reshape(2, 5, 3)
    got = ev.reward_scores(ensemble, samples)
    assert got.shape == (2, 5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="RewardModel"):
        ev.reward_scores(lambda x: x, samples)


def test_programmatic_scores_and_judge(drawn):
    _, _, samples = drawn
    count = ev.token_scores(lambda tokens, mask: ((tokens == 5) & mask).sum(-1), samples)
    np.testing.assert_array_equal(count, ((samples.tokens == 5) & samples.mask).sum(-1))
    with pytest.raises(ValueError, match=r"\[R\]"):
        ev.token_scores(lambda tokens, mask: tokens, samples)
    texts = [[" ".join(map(str, r)) for r in rows] for rows in samples.responses()]
    prompts_text = [f"prompt {p}" for p in range(5)]
    lengths = ev.text_scores(lambda p, r: len(r.split()), prompts_text, texts)
    np.testing.assert_array_equal(lengths, samples.lengths)
    flipped = [rows[::-1] for rows in texts]
    outcomes = ev.judge_pairs(lambda p, a, b: int(np.sign(len(a.split()) - len(b.split()))),
                              prompts_text, texts, flipped)
    np.testing.assert_array_equal(
        outcomes, np.sign(samples.lengths - samples.lengths[:, ::-1]))
    with pytest.raises(ValueError, match=r"\+1, 0 or -1"):
        ev.judge_pairs(lambda p, a, b: 2, prompts_text, texts, flipped)
    with pytest.raises(ValueError, match="same number"):
        ev.judge_pairs(lambda p, a, b: 0, prompts_text, texts[:4] + [texts[4][:2]], flipped)


def test_bad_inputs_raise_eagerly(models):
    ids, mask = prompts(0, 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_samples"):
        ev.SamplingConfig(num_samples=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        ev.SamplingConfig(num_samples=1, max_new_tokens=3, top_p=1.5)
    with pytest.raises(ValueError, match=r"prompt rows \[1\]"):
        ev.sample(models[0], ids, np.where(np.arange(4)[:, None] == 1, 0, mask), key=key,
                  config=CONFIG)
    with pytest.raises(ValueError, match="must match"):
        ev.sample(models[0], ids, mask[:, 1:], key=key, config=CONFIG)
    with pytest.raises(TypeError, match="integer"):
        ev.sample(models[0], ids.astype(np.float32), mask, key=key, config=CONFIG)
    wide = np.ones((2, 8), np.int32)
    with pytest.raises(ValueError, match="prompt_length=6"):
        ev.sample(models[0], wide, wide, key=key, config=CONFIG)
