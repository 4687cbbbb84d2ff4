"""Collating tokenized examples into padded numpy batches with masks for `sequence_logprobs`.

Every sequence is `prompt + response`, right-padded to a bucket length chosen per batch from a
few fixed lengths (so a jitted step compiles once per bucket, not once per batch). Per response
role r ("chosen", "rejected", "response_1", "response_2"):

    r_input_ids       [B, T] int32   (grouped: [B, K, T])
    r_attention_mask  [B, T] int32   1 on prompt + response tokens
    r_loss_mask       [B, T] bool    True on response tokens: the token at t is scored by the
                                     logits at t - 1, see `alignax.logprobs.next_token_targets`
    r_group_mask      [B, K] bool    grouped batches only: which of the K members exist
    r_bin             [B] int32      with per-response bins only (grouped: [B, K], -1 on
                                     absent members)

plus "prompt_input_ids"/"prompt_attention_mask" [B, P] (LEFT-padded, for generation),
"record_index" [B] int32, and when present "bin" [B] int32 and
"target_rewards_1"/"target_rewards_2" ([B] for a scalar column, [B, E] for a list column: every
column leads with the batch axis B).

With `share_prompt=True` each example's M responses (every role's K members, roles in sorted
order) also follow ONE copy of its prompt in a packed row, so the prompt is run through the
model once instead of M times (`alignax.training.step.StepConfig.share_prompt`):

    packed_input_ids       [B, L] int32  prompt, response 1, ..., response M, right-padded
    packed_attention_mask  [B, L] int32  1 on real tokens
    packed_positions       [B, L] int32  prompt 0..p-1; every response counts on from p
    packed_segment_ids     [B, L] int32  0 on the prompt (and padding), m on response m
    packed_score_index     [B, M, R] int32  index in the row of the hidden state that predicts
                                            token i of response m (the prompt's last token
                                            for i = 0)
    packed_score_targets   [B, M, R] int32  token i of response m
    packed_score_mask      [B, M, R] bool   True on the tokens to score

Summing log-probs over `packed_score_mask` gives the same [B, M] values as scoring the M
unpacked rows (the roles' "loss_mask" tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from alignax.data.tokenize import TokenizedExample

REWARD_KEYS = {"response_1": "target_rewards_1", "response_2": "target_rewards_2"}


def bucket_lengths(max_length: int, *, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_length`, then `max_length`.

    >>> bucket_lengths(512)
    (32, 64, 128, 256, 512)
    >>> bucket_lengths(100, smallest=16)
    (16, 32, 64, 100)
    """
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length}, {smallest}")
    lengths = []
    length = smallest
    while length < max_length:
        lengths.append(length)
        length *= 2
    return (*lengths, max_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `length` (buckets sorted ascending)."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"a sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def _pad_sequences(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray | None],
                   length: int, pad_token_id: int):
    """Right-padded prompt + response rows; a None response is an absent group member, stored
    as one attended pad token with an empty loss mask so that no attention row is all masked."""
    n = len(prompts)
    ids = np.full((n, length), pad_token_id, dtype=np.int32)
    attention = np.zeros((n, length), dtype=np.int32)
    loss = np.zeros((n, length), dtype=bool)
    for j, (prompt, response) in enumerate(zip(prompts, responses)):
        if response is None:
            attention[j, 0] = 1
            continue
        p, r = len(prompt), len(response)
        ids[j, :p] = prompt
        ids[j, p:p + r] = response
        attention[j, :p + r] = 1
        loss[j, p:p + r] = True
    return ids, attention, loss


def _packed_buckets(largest: int, *, smallest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` and 1.5 times each, below `largest`, then `largest`.

    >>> _packed_buckets(256, smallest=32)
    (32, 48, 64, 96, 128, 192, 256)
    """
    powers = bucket_lengths(largest, smallest=smallest)
    return tuple(sorted({*powers, *(b * 3 // 2 for b in powers[:-1] if b * 3 // 2 < largest)}))


def _pack_shared_prompt(prompts: Sequence[np.ndarray],
                        members: Sequence[Sequence[np.ndarray | None]], *,
                        buckets: Sequence[int], pad_token_id: int) -> dict[str, np.ndarray]:
    """The "packed_*" columns (module docstring) of B prompts, each followed by its M members
    (None: an absent group member, no tokens).

    The packed length L and the response width R are padded to a power of two or 1.5 times
    one (`_packed_buckets`): finer steps than the rows' buckets, because every padded slot of
    L runs through the whole model and every one of R through the unembedding.
    """
    n, m = len(prompts), len(members[0])
    row_lengths = [len(p) + sum(0 if r is None else len(r) for r in rs)
                   for p, rs in zip(prompts, members)]
    length = bucket_for(max(row_lengths), _packed_buckets(m * buckets[-1], smallest=buckets[0]))
    longest = max((len(r) for rs in members for r in rs if r is not None), default=1)
    width = bucket_for(longest, _packed_buckets(buckets[-1], smallest=min(8, buckets[0])))
    ids = np.full((n, length), pad_token_id, dtype=np.int32)
    attention = np.zeros((n, length), dtype=np.int32)
    positions = np.zeros((n, length), dtype=np.int32)
    segments = np.zeros((n, length), dtype=np.int32)
    index = np.zeros((n, m, width), dtype=np.int32)
    targets = np.full((n, m, width), pad_token_id, dtype=np.int32)
    score = np.zeros((n, m, width), dtype=bool)
    for j, (prompt, responses) in enumerate(zip(prompts, members)):
        p = len(prompt)
        ids[j, :p] = prompt
        positions[j, :p] = np.arange(p)
        start = p
        for k, response in enumerate(responses):
            if response is None or len(response) == 0:
                continue
            r = len(response)
            ids[j, start:start + r] = response
            positions[j, start:start + r] = p + np.arange(r)
            segments[j, start:start + r] = k + 1
            # Token i is predicted by the hidden state before it: the prompt's last for i = 0.
            index[j, k, :r] = np.concatenate([[max(p - 1, 0)], start + np.arange(r - 1)])
            targets[j, k, :r] = response
            score[j, k, :r] = True
            score[j, k, 0] = p > 0  # as unpacked: nothing predicts a row's very first token
            start += r
        attention[j, :start] = 1
    return {"packed_input_ids": ids, "packed_attention_mask": attention,
            "packed_positions": positions, "packed_segment_ids": segments,
            "packed_score_index": index, "packed_score_targets": targets,
            "packed_score_mask": score}


def _all_or_none(examples: Sequence[TokenizedExample], name: str, has) -> bool:
    """Whether every example has the side column `name`; ValueError if only some do."""
    having = [has(ex) for ex in examples]
    if any(having) and not all(having):
        raise ValueError(f"records {[ex.index for ex, h in zip(examples, having) if not h]} have "
                         f"no {name!r} but records "
                         f"{[ex.index for ex, h in zip(examples, having) if h]} do")
    return all(having)


def collate(examples: Sequence[TokenizedExample], *, buckets: Sequence[int],
            prompt_buckets: Sequence[int], pad_token_id: int,
            group_sizes: Mapping[str, int] | None = None,
            share_prompt: bool = False) -> dict[str, np.ndarray]:
    """Stacks examples into one padded batch (the keys are listed in the module docstring).

    Args:
      examples: B tokenized examples of one dataset (same roles, same side columns).
      buckets: allowed sequence lengths T, ascending; the batch takes the smallest that fits.
      prompt_buckets: allowed left-padded prompt lengths P.
      pad_token_id: the id written at padded positions.
      group_sizes: role -> K for grouped data (every example padded to K members); None for
        one response per role.
      share_prompt: also emit the "packed_*" columns: one prompt followed by all responses.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    roles = tuple(examples[0].responses)
    longest = max(len(ex.prompt_ids) + len(r) for ex in examples for role in roles
                  for r in ex.responses[role])
    length = bucket_for(longest, buckets)
    sizes = {role: 1 if group_sizes is None else group_sizes[role] for role in roles}
    for role, k in sizes.items():
        if group_sizes is not None and max(len(ex.responses[role]) for ex in examples) > k:
            raise ValueError(f"a {role!r} group has more than group_sizes[{role!r}]={k} members")
    # role -> per example its K members, None for an absent one (ungrouped: K = 1)
    padded = {role: [tuple(ex.responses[role]) + (None,) * (k - len(ex.responses[role]))
                     for ex in examples] for role, k in sizes.items()}
    batch: dict[str, np.ndarray] = {}
    for role in roles:
        if group_sizes is None:
            ids, attention, loss = _pad_sequences(
                [ex.prompt_ids for ex in examples], [group[0] for group in padded[role]],
                length, pad_token_id)
        else:
            k = sizes[role]
            ids, attention, loss = _pad_sequences(
                [ex.prompt_ids for ex in examples for _ in range(k)],
                [r for group in padded[role] for r in group], length, pad_token_id)
            ids, attention, loss = (a.reshape(len(examples), k, length)  # [B*K, T] -> [B, K, T]
                                    for a in (ids, attention, loss))
            batch[f"{role}_group_mask"] = np.array([[r is not None for r in group]
                                                    for group in padded[role]], dtype=bool)
        batch[f"{role}_input_ids"] = ids
        batch[f"{role}_attention_mask"] = attention
        batch[f"{role}_loss_mask"] = loss

    prompt_length = bucket_for(max(len(ex.prompt_ids) for ex in examples), prompt_buckets)
    prompt_ids = np.full((len(examples), prompt_length), pad_token_id, dtype=np.int32)
    prompt_mask = np.zeros((len(examples), prompt_length), dtype=np.int32)
    for j, ex in enumerate(examples):  # left padding: the prompt ends at the last column
        prompt_ids[j, prompt_length - len(ex.prompt_ids):] = ex.prompt_ids
        prompt_mask[j, prompt_length - len(ex.prompt_ids):] = 1
    batch["prompt_input_ids"] = prompt_ids
    batch["prompt_attention_mask"] = prompt_mask
    batch["record_index"] = np.array([ex.index for ex in examples], dtype=np.int32)
    if _all_or_none(examples, "bin", lambda ex: ex.bin is not None):
        batch["bin"] = np.array([ex.bin for ex in examples], dtype=np.int32)
    if _all_or_none(examples, "response_bins", lambda ex: bool(ex.response_bins)):
        for role, k in sizes.items():
            bins = [ex.response_bins[role] + (-1,) * (k - len(ex.response_bins[role]))
                    for ex in examples]  # -1: an absent group member
            batch[f"{role}_bin"] = np.array(bins if group_sizes is not None
                                            else [b[0] for b in bins], dtype=np.int32)
    if share_prompt:
        members = [[r for role in sorted(roles) for r in padded[role][j]]
                   for j in range(len(examples))]
        batch.update(_pack_shared_prompt([ex.prompt_ids for ex in examples], members,
                                         buckets=buckets, pad_token_id=pad_token_id))
    for role, key in REWARD_KEYS.items():
        if role in examples[0].rewards:
            # [B] for scalar rewards; [B, E] for an ensemble's (the batch axis first)
            batch[key] = np.asarray([ex.rewards[role] for ex in examples], dtype=np.float32)
    return batch
