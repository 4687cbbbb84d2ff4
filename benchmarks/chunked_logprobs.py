"""Peak memory and time of naive vs chunked sequence log-probs, value and gradient, on CPU.

Naive: `sequence_logprobs(hidden @ unembedding, targets, mask)`, which materialises the
[B, T, V] float32 logits (and more of that size for the gradient). Chunked:
`chunked_sequence_logprobs(hidden, unembedding, targets, mask, chunk_size=, vocab_chunk_size=)`.
Both compute the value and the gradient w.r.t. hidden and unembedding of sum_b log pi(y_b|x_b)
under one `jax.jit`.

Each variant runs in a fresh subprocess (so whole-process peak RSS, `ru_maxrss`, is that
variant's peak): it compiles ahead of time (timed separately) and then makes `--repeats` timed
calls; the median is reported. The same variant at a tiny size (B=1, T=8, D=8, V=64), also in a
fresh subprocess, measures what the Python/JAX runtime and the compiler take by themselves; that
is subtracted before comparing with the analytic floor: inputs (hidden, unembedding, targets,
mask) + the gradients of hidden and unembedding + one [chunk_size, vocab_chunk_size] float32
block of logits. XLA's own accounting (`compiled.memory_analysis()`: arguments + outputs +
temporaries) is printed next to it.

Default chunking: 2048 positions x 8192 vocabulary entries, a 64 MiB float32 block. Blocks of
this size keep each matmul large ([2048, D] x [D, 8192]) so the per-block loop overhead is
negligible, while the block stays ~5% of the floor; chunking the vocabulary (not only the
positions) is what keeps the backward pass from forming a [D, V] temporary per chunk.

Run (the issue's size; one naive call takes minutes on 2 busy cores):
    .venv/bin/python benchmarks/chunked_logprobs.py --repeats 1
Small smoke run:
    .venv/bin/python benchmarks/chunked_logprobs.py --batch 1 --length 256 --dim 64 --vocab 4096 \
        --chunk-size 256 --vocab-chunk-size 1024 --repeats 1
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-size", type=int, default=2048,
                        help="positions per chunk (of the B*T flattened positions)")
    parser.add_argument("--vocab-chunk-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after compilation")
    parser.add_argument("--variants", default="naive,chunked")
    parser.add_argument("--concurrent", action="store_true",
                        help="run the variants' processes at the same time, so that on a shared, "
                             "busy machine both see the same contention (their time ratio is "
                             "then the fair comparison); peak RSS stays per process")
    parser.add_argument("--worker", choices=("naive", "chunked"), default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _worker(args: argparse.Namespace) -> dict:
    """Runs one variant in this process and returns its measurements."""
    import jax
    import jax.numpy as jnp

    from alignax.logprobs import chunked_sequence_logprobs, sequence_logprobs

    shape = (args.batch, args.length)

    @jax.jit
    def make_inputs(key):
        k_h, k_w, k_y = jax.random.split(key, 3)
        hidden = jax.random.normal(k_h, (*shape, args.dim), jnp.float32)
        targets = jax.random.randint(k_y, shape, 0, args.vocab, jnp.int32)

        # Row by row, so that making the unembedding takes no more memory than it holds (random
        # bits and a rescaled copy of a [D, V] array would otherwise set the whole-process peak).
        def set_row(d, unembedding):
            row = jax.random.normal(jax.random.fold_in(k_w, d), (1, args.vocab), jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(unembedding, row / args.dim**0.5, d, 0)

        unembedding = jax.lax.fori_loop(0, args.dim, set_row,
                                        jnp.zeros((args.dim, args.vocab), jnp.float32))
        return hidden, unembedding, targets, jnp.ones(shape, bool)

    hidden, unembedding, targets, mask = make_inputs(jax.random.key(0))

    if args.worker == "naive":
        def total(h, w):
            return jnp.sum(sequence_logprobs(h @ w, targets, mask))
    else:
        def total(h, w):
            return jnp.sum(chunked_sequence_logprobs(
                h, w, targets, mask, chunk_size=args.chunk_size,
                vocab_chunk_size=args.vocab_chunk_size))

    start = time.perf_counter()
    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1))).lower(hidden, unembedding).compile()
    compile_s = time.perf_counter() - start
    xla = step.memory_analysis()
    xla_bytes = (xla.argument_size_in_bytes + xla.output_size_in_bytes
                 + xla.temp_size_in_bytes - xla.alias_size_in_bytes)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        value, (d_hidden, d_unembedding) = jax.block_until_ready(step(hidden, unembedding))
        times.append(time.perf_counter() - start)
        print(f"{args.worker}: call {len(times)} took {times[-1]:.2f} s", file=sys.stderr,
              flush=True)
        summary = {"value": float(value), "d_hidden_norm": float(jnp.linalg.norm(d_hidden)),
                   "d_unembedding_norm": float(jnp.linalg.norm(d_unembedding))}
        del value, d_hidden, d_unembedding  # the next call must not overlap with these outputs
    return {"peak_rss": _max_rss_bytes(), "xla_bytes": xla_bytes,
            "xla_temp_bytes": xla.temp_size_in_bytes, "compile_s": compile_s, "times_s": times,
            "median_s": statistics.median(times), **summary}


def _start_worker(args: argparse.Namespace, worker: str, *, tiny: bool) -> subprocess.Popen:
    sizes = {"batch": 1, "length": 8, "dim": 8, "vocab": 64, "repeats": 1} if tiny else {}
    argv = [sys.executable, __file__, "--worker", worker] + [
        f"--{name.replace('_', '-')}={sizes.get(name, value)}" for name, value in vars(args).items()
        if name not in ("worker", "variants", "concurrent")]
    env = {**os.environ, "PYTHONPATH": f"{_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    stdout, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"benchmark worker {process.args} failed ({process.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])


def _run_workers(args: argparse.Namespace) -> dict:
    """{variant: measurements}, each variant and its tiny twin in its own fresh process."""
    jobs = [(name, tiny) for name in args.variants.split(",") for tiny in (False, True)]
    if args.concurrent:
        started = [(job, _start_worker(args, job[0], tiny=job[1])) for job in jobs]
        done = {job: _result(process) for job, process in started}
    else:
        done = {job: _result(_start_worker(args, job[0], tiny=job[1])) for job in jobs}
    return {name: {**done[name, False], "runtime_rss": done[name, True]["peak_rss"]}
            for name in args.variants.split(",")}


def _floor_bytes(args: argparse.Namespace) -> dict:
    positions = args.batch * args.length
    block = min(args.chunk_size, positions) * min(args.vocab_chunk_size, args.vocab) * 4
    parts = {"hidden": positions * args.dim * 4, "unembedding": args.dim * args.vocab * 4,
             "targets_mask": positions * (4 + 1), "d_hidden": positions * args.dim * 4,
             "d_unembedding": args.dim * args.vocab * 4, "one_block": block}
    return {**parts, "total": sum(parts.values())}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(args)))
        return
    gib = 2.0**30
    load_before = _load()
    results = _run_workers(args)
    floor = _floor_bytes(args)
    print(f"B={args.batch} T={args.length} D={args.dim} V={args.vocab} "
          f"chunk_size={args.chunk_size} vocab_chunk_size={args.vocab_chunk_size} "
          f"repeats={args.repeats} concurrent={args.concurrent}; "
          f"load average before {load_before}, after {_load()}")
    print(f"analytic floor {floor['total'] / gib:.3f} GiB = "
          + " + ".join(f"{k} {v / gib:.3f}" for k, v in floor.items() if k != "total"))
    print(f"{'variant':<8} {'peak RSS':>9} {'runtime':>8} {'RSS-rt':>7} {'/floor':>7} "
          f"{'XLA':>7} {'/floor':>7} {'median s':>9} {'compile s':>9} {'value':>14}  (GiB)")
    for name, r in results.items():
        above = r["peak_rss"] - r["runtime_rss"]
        r["peak_minus_runtime"] = above
        r["peak_over_floor"] = above / floor["total"]
        r["xla_over_floor"] = r["xla_bytes"] / floor["total"]
        print(f"{name:<8} {r['peak_rss'] / gib:9.3f} {r['runtime_rss'] / gib:8.3f} "
              f"{above / gib:7.3f} {r['peak_over_floor']:7.2f} {r['xla_bytes'] / gib:7.3f} "
              f"{r['xla_over_floor']:7.2f} {r['median_s']:9.2f} {r['compile_s']:9.2f} "
              f"{r['value']:14.6g}")
    summary = {"config": {k: v for k, v in vars(args).items() if k != "worker"},
               "floor_bytes": floor, "results": results,
               "load_average_before": load_before, "load_average_after": _load()}
    if {"naive", "chunked"} <= results.keys():
        naive, chunked = results["naive"], results["chunked"]
        summary["time_ratio_chunked_over_naive"] = chunked["median_s"] / naive["median_s"]
        summary["value_rel_diff"] = abs(chunked["value"] - naive["value"]) / abs(naive["value"])
        peak_ratio = chunked["peak_minus_runtime"] / naive["peak_minus_runtime"]
        print(f"chunked/naive: time {summary['time_ratio_chunked_over_naive']:.2f}x, "
              f"peak above runtime {peak_ratio:.2f}x, "
              f"value rel. diff {summary['value_rel_diff']:.1e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
