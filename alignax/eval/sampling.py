"""K samples per prompt from a policy, and the log-probabilities of samples under any model.

    prompts [P, L] --repeat K--> rows [P K, L] --fixed batches of `batch_size` rows-->
    generate (KV cache; batch i draws with fold_in(key, i)) --> tokens [P, K, N], mask [P, K, N]
    --> log pi(y|x) [P, K] at temperature 1 and at the sampling temperature (chunked log-probs)

Every call runs on the same shapes ([batch_size, L] prompts, [batch_size, L + N] sequences):
the last batch is filled up with copies of a real row whose outputs are discarded, and prompts
are left-padded to `prompt_length`, so nothing recompiles from one batch, policy or prompt set
to the next. The draws are a deterministic function of (key, prompts, config); a different
`batch_size` groups rows differently and gives different (equally valid) draws.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.logprobs import chunked_sequence_logprobs, next_token_targets
from alignax.models import CausalLM, generate


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample K responses per prompt.

    Attributes:
      num_samples: K responses per prompt.
      max_new_tokens: N, the response length cap.
      temperature: softmax temperature (0: greedy).
      top_k, top_p: `alignax.models.generate`'s filters (None: off).
      eos_token_id: one id or several; a response stops after one (kept in the response).
      pad_token_id: written after a response has stopped and on the left of short prompts.
      batch_size: rows (prompt copies) per generate / scoring call, the compiled batch shape.
      prompt_length: L, the compiled prompt width (None: the longest prompt given). Fix it when
        several prompt sets are evaluated, so that they share one compilation.
      chunk_size: tokens per block of the chunked log-prob computation.
    """

    num_samples: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int = 0
    batch_size: int = 64
    prompt_length: int | None = None
    chunk_size: int = 1024

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "batch_size", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.prompt_length is not None and self.prompt_length < 1:
            raise ValueError(f"prompt_length must be None or >= 1, got {self.prompt_length!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")

    @property
    def from_policy(self) -> bool:
        """Whether samples are draws from the policy itself (temperature 1, no filter), which
        the divergence estimates need."""
        return self.temperature == 1.0 and self.top_k is None and self.top_p in (None, 1.0)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(int(i) for i in np.atleast_1d(self.eos_token_id))


@dataclasses.dataclass(frozen=True)
class Samples:
    """K sampled responses for each of P prompts (host NumPy arrays).

    Attributes:
      prompt_ids: [P, L] int32, left-padded to the config's prompt width.
      prompt_mask: [P, L] bool.
      tokens: [P, K, N] int32 responses (pad after a response stopped).
      mask: [P, K, N] bool, True on response tokens (EOS included).
      logprobs: [P, K] float32 log pi(y|x) under the sampling policy at temperature 1.
      sampling_logprobs: [P, K] float32 log-probs under the distribution sampled from: the
        policy's softmax at the sampling temperature (before any top-k / top-p filter); 0 for
        greedy decoding. The same values as `logprobs` at temperature 1.
      config: the SamplingConfig used.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    config: SamplingConfig

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        """[P, K] int response lengths in tokens."""
        return self.mask.sum(-1)

    def responses(self) -> list[list[list[int]]]:
        """The responses without padding: P lists of K token lists."""
        return [[row[m].tolist() for row, m in zip(tokens, mask)]
                for tokens, mask in zip(self.tokens, self.mask)]

    def texts(self, tokenizer, *, skip_special_tokens: bool = True) -> list[list[str]]:
        """The responses decoded by an HF tokenizer: P lists of K strings."""
        return [[tokenizer.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]
                for rows in self.responses()]

    def sequences(self) -> dict[str, np.ndarray]:
        """Prompt + response rows [P K, L + N]: "input_ids", "attention_mask" and "loss_mask"
        (True on response tokens), sample k of prompt p in row p K + k."""
        k = self.num_samples
        prompt_ids = np.repeat(self.prompt_ids, k, axis=0)  # [P K, L]
        prompt_mask = np.repeat(self.prompt_mask, k, axis=0)
        tokens = self.tokens.reshape(-1, self.tokens.shape[-1])  # [P, K, N] -> [P K, N]
        mask = self.mask.reshape(tokens.shape)
        return {"input_ids": np.concatenate([prompt_ids, tokens], axis=1),
                "attention_mask": np.concatenate([prompt_mask, mask], axis=1),
                "loss_mask": np.concatenate([np.zeros_like(prompt_mask), mask], axis=1)}


def encode_prompts(tokenizer, prompts: Sequence[str], *, add_bos: bool = True,
                   prompt_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids [P, L] int32 and mask [P, L] bool from texts.

    Args:
      tokenizer: an HF tokenizer (its pad id fills the padding, 0 if it has none).
      prompts: P texts.
      add_bos: start every prompt with the tokenizer's BOS token (when it has one).
      prompt_length: L (None: the longest prompt); a longer prompt is an error.
    """
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    width = prompt_length or max(map(len, rows))
    long = [i for i, r in enumerate(rows) if len(r) > width]
    if long:
        raise ValueError(f"prompts {long[:8]} are longer than prompt_length={width} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):], mask[i, width - len(row):] = row, True
    return ids, mask


def _left_pad(prompt_ids: np.ndarray, prompt_mask: np.ndarray, config: SamplingConfig):
    """Checks prompts [P, L'] and left-pads them to the config's width L."""
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"prompt_ids [P, L] and prompt_mask [P, L] must match, got "
                         f"{ids.shape} and {mask.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompt_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.shape[0] == 0:
        raise ValueError("no prompts given (prompt_ids has P = 0 rows)")
    empty = np.flatnonzero(~mask.any(-1))
    if empty.size:
        raise ValueError(f"prompt rows {empty[:8].tolist()} have no real token (all padding)")
    width = config.prompt_length or ids.shape[1]
    real = mask.sum(-1)
    long = np.flatnonzero(real > width)
    if long.size:
        raise ValueError(f"prompts {long[:8].tolist()} have more than prompt_length={width} "
                         f"real tokens")
    if ids.shape[1] > width:
        # Wider than L but every prompt fits: move each row's real tokens (left- or
        # right-padded) to the right end of an L-wide row.
        out_ids = np.full((ids.shape[0], width), config.pad_token_id, np.int32)
        out_mask = np.zeros((ids.shape[0], width), bool)
        for i in range(ids.shape[0]):
            out_ids[i, width - real[i]:], out_mask[i, width - real[i]:] = ids[i, mask[i]], True
        return out_ids, out_mask
    extra = width - ids.shape[1]
    ids = np.pad(ids.astype(np.int32), ((0, 0), (extra, 0)), constant_values=config.pad_token_id)
    return ids, np.pad(mask, ((0, 0), (extra, 0)))


def _in_batches(fn: Callable[[int, dict[str, np.ndarray]], np.ndarray],
                rows: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """fn(batch index, rows[b B : (b + 1) B]) over fixed-size batches, concatenated on the last
    axis of fn's output ([..., B] per batch -> [..., R]). The last batch is filled up with
    copies of row 0, whose outputs are discarded."""
    total = len(next(iter(rows.values())))
    outputs = []
    for b, start in enumerate(range(0, total, batch_size)):
        index = np.arange(start, start + batch_size)
        index = np.where(index < total, index, 0)  # filler rows: copies of row 0
        out = np.asarray(fn(b, {name: x[index] for name, x in rows.items()}))
        outputs.append(out[..., :min(batch_size, total - start)])
    return np.concatenate(outputs, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _sequence_logprobs(graphdef, state, input_ids, attention_mask, loss_mask,
                       inverse_temperatures, *, chunk_size):
    """[J] inverse temperatures -> [J, B] sum over loss_mask of log softmax(logits / T)."""
    model: CausalLM = nnx.merge(graphdef, state)
    attention_mask = attention_mask.astype(bool)
    hidden = model.hidden_states(input_ids, attention_mask).astype(jnp.float32)  # [B, T, D]
    targets, mask = next_token_targets(input_ids, loss_mask.astype(bool) & attention_mask)
    unembedding = model.unembedding()  # [D, V]
    # logits / T = (hidden / T) @ unembedding: one chunked pass per temperature.
    return jnp.stack([chunked_sequence_logprobs(hidden * inverse_temperatures[j], unembedding,
                                                targets, mask, chunk_size=chunk_size)
                      for j in range(inverse_temperatures.shape[0])])


def _logprobs_at(model: CausalLM, rows: dict[str, np.ndarray], inverse_temperatures,
                 config: SamplingConfig) -> np.ndarray:
    """[J, R] log-probs of the rows' responses at each inverse temperature."""
    graphdef, state = nnx.split(model)
    inverse = jnp.asarray(inverse_temperatures, jnp.float32)

    def score(_, batch):
        return _sequence_logprobs(graphdef, state, batch["input_ids"], batch["attention_mask"],
                                  batch["loss_mask"], inverse, chunk_size=config.chunk_size)

    return _in_batches(score, rows, config.batch_size)


def sample(model: CausalLM, prompt_ids, prompt_mask, *, key: jax.Array,
           config: SamplingConfig) -> Samples:
    """K = config.num_samples responses per prompt from `model`, with their log-probs.

    Args:
      model: the policy, a CausalLM (on a mesh or not).
      prompt_ids: [P, L'] int token ids, left- or right-padded, L' <= config.prompt_length
        real tokens per row.
      prompt_mask: [P, L'] 1 on real prompt tokens (every row needs one).
      key: PRNG key; batch i of rows samples with `fold_in(key, i)`.
      config: the SamplingConfig.

    Returns:
      Samples with tokens [P, K, N] and log-probs [P, K].

    Raises:
      ValueError / TypeError: bad prompt shapes, dtypes, empty or too long prompts.
    """
    ids, mask = _left_pad(prompt_ids, prompt_mask, config)  # [P, L]
    k = config.num_samples
    rows = {"ids": np.repeat(ids, k, axis=0), "mask": np.repeat(mask, k, axis=0)}  # [P K, L]

    def draw(b, batch):
        tokens, token_mask = generate(
            model, batch["ids"], batch["mask"], key=jax.random.fold_in(key, b),
            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_k=config.top_k, top_p=config.top_p, eos_token_id=config.eos_ids or None,
            pad_token_id=config.pad_token_id)
        # [B, N] each -> one [N + N, B] array so that _in_batches cuts the row axis (last).
        return np.concatenate([np.asarray(tokens).T, np.asarray(token_mask).T.astype(np.int32)])

    drawn = _in_batches(draw, rows, config.batch_size)  # [2 N, P K]
    n = config.max_new_tokens
    tokens = drawn[:n].T.reshape(-1, k, n).astype(np.int32)  # [P K, N] -> [P, K, N]
    token_mask = drawn[n:].T.reshape(-1, k, n).astype(bool)
    samples = Samples(ids, mask, tokens, token_mask, np.zeros(tokens.shape[:2], np.float32),
                      np.zeros(tokens.shape[:2], np.float32), config)
    temperatures = [1.0] if config.temperature in (0.0, 1.0) else [1.0, 1.0 / config.temperature]
    logps = _logprobs_at(model, samples.sequences(), temperatures, config).reshape(
        len(temperatures), -1, k)  # [J, P K] -> [J, P, K]
    if config.temperature == 0.0:  # greedy decoding: each response has probability 1
        sampling = np.zeros_like(logps[0])
    else:
        sampling = logps[-1]
    return dataclasses.replace(samples, logprobs=logps[0].astype(np.float32),
                               sampling_logprobs=sampling.astype(np.float32))


def response_logprobs(model: CausalLM, samples: Samples, *, temperature: float = 1.0
                      ) -> np.ndarray:
    """[P, K] float32 log model(y|x) of the samples' responses under another model (e.g. the
    reference, for h = samples.logprobs - response_logprobs(reference, samples)).

    Args:
      model: a CausalLM with the samples' vocabulary.
      samples: from `sample`.
      temperature: score under softmax(logits / temperature) (> 0).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logps = _logprobs_at(model, samples.sequences(), [1.0 / temperature], samples.config)
    return logps[0].reshape(samples.tokens.shape[:2]).astype(np.float32)
