"""Cost of the binned MMD^2 regulariser next to a train step of a tiny transformer.

    .venv/bin/python benchmarks/binned_mmd.py            # N=1024, M=60 + scaling sweep
    .venv/bin/python benchmarks/binned_mmd.py --quick    # fewer sizes and repeats

Times jitted value-and-grad of `alignax.objectives.binned_mmd2` (features = one scalar per
response, as CRM / Causal DPO regularise rewards or log-ratios; and D=64 latent features) at
N = 1024 responses and M = 60 bins (the demographic bins of §4.12.2), then sweeps N and M.
The reference is value-and-grad of the next-token loss of the embedded tiny model
(`alignax.models.tiny_config("llama", vocab_size=1024)`: 2 layers, hidden 64, 4 heads, 2 KV
heads, MLP 172) on the same N sequences of T tokens, i.e. the forward/backward of a train
step without the optimizer update. Everything runs in one process, so the ratios are the result; absolute times depend on
the (noisy, shared) machine. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

import alignax.models as am
from alignax.objectives import binned_mmd2

VOCAB = 1024  # the embedded default tokenizer's vocabulary


def _timeit(fn, *args, repeats: int) -> float:
    """Median wall seconds of a compiled call (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def mmd_step(n: int, m: int, d: int | None, repeats: int) -> float:
    key = jax.random.key(0)
    shape = (n,) if d is None else (n, d)
    feats = jax.random.normal(key, shape)
    bins = jax.random.randint(jax.random.key(1), (n,), 0, m)
    f = jax.jit(jax.value_and_grad(
        lambda x: binned_mmd2(x, bins, num_bins=m, bandwidth=1.0, reduction="mean")))
    return _timeit(f, feats, repeats=repeats)


def model_step(n: int, t: int, repeats: int) -> float:
    """value-and-grad of the next-token loss of the embedded tiny llama on [n, t] tokens."""
    cfg = am.tiny_config("llama", vocab_size=VOCAB)
    graphdef, state = nnx.split(am.create(cfg, rngs=nnx.Rngs(0)))

    def loss(state, tokens):  # tokens [N, T]
        logits = nnx.merge(graphdef, state)(tokens)  # [N, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    tokens = jax.random.randint(jax.random.key(3), (n, t), 0, VOCAB)
    return _timeit(jax.jit(jax.value_and_grad(loss)), state, tokens, repeats=repeats)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=64)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    repeats = 3 if args.quick else 10
    n_ref, m_ref = 1024, 60

    model_s = model_step(n_ref, args.seq_len, repeats)
    scalar_s = mmd_step(n_ref, m_ref, None, repeats)
    latent_s = mmd_step(n_ref, m_ref, 64, repeats)
    rows = [("tiny llama value+grad", n_ref, "-", model_s),
            ("binned_mmd2 value+grad, features [N]", n_ref, m_ref, scalar_s),
            ("binned_mmd2 value+grad, features [N, 64]", n_ref, m_ref, latent_s)]
    ns = (256, 1024, 4096) if args.quick else (256, 512, 1024, 2048, 4096)
    ms = (10, 60) if args.quick else (10, 30, 60, 120)
    sweep = {}
    for n in ns:
        for m in ms:
            sweep[(n, m)] = mmd_step(n, m, None, repeats)
            rows.append(("binned_mmd2 value+grad, features [N]", n, m, sweep[(n, m)]))

    print(f"device: {jax.devices()[0].device_kind}; tiny llama: N={n_ref} sequences x "
          f"T={args.seq_len} tokens")
    print(f"{'workload':44s} {'N':>6s} {'M':>5s} {'ms':>10s} {'/ model step':>13s}")
    for name, n, m, s in rows:
        print(f"{name:44s} {n:6d} {m!s:>5s} {1e3 * s:10.3f} {s / model_s:13.4f}")
    print(json.dumps({
        "benchmark": "binned_mmd", "device": jax.devices()[0].device_kind,
        "platform": platform.machine(), "seq_len": args.seq_len,
        "model_step_ms": 1e3 * model_s, "mmd_scalar_ms": 1e3 * scalar_s,
        "mmd_latent64_ms": 1e3 * latent_s, "mmd_scalar_over_model": scalar_s / model_s,
        "mmd_latent64_over_model": latent_s / model_s,
        "sweep_ms": {f"N={n},M={m}": 1e3 * s for (n, m), s in sweep.items()},
    }))


if __name__ == "__main__":
    main()
