"""Memory and compile time of a real DPO train step against depth and remat policy.

    .venv/bin/python benchmarks/scale_core.py                       # the BUILD.md table
    .venv/bin/python benchmarks/scale_core.py --layers 8 --remats none,full --compile-layers ""

The step is `alignax.training.step.make_train_step` for DPO (frozen reference recomputed every
step, AdamW + clipping) on a Llama with hidden 256, 8 heads, 4 KV heads, MLP 688, vocab 4096,
float32, on one device; the batch is 8 pairs of 128 prompt + 128 response tokens, i.e.
8 x 256 tokens per role. For each (layers, remat) the step is lowered and compiled in a fresh
process; the numbers are XLA's own accounting of the compiled program
(`compiled.memory_analysis()`: temp = the live intermediates, argument = params, optimizer
state, reference params and batch) and the wall time of `lower` + `compile` (no persistent
compilation cache). Nothing is run, so the machine's load only affects compile times; the
remat=None compile times at --compile-layers are the median of --repeats fresh processes,
alternating the depths. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HIDDEN, HEADS, KV_HEADS, MLP, VOCAB = 256, 8, 4, 688, 4096
PAIRS, PROMPT, RESPONSE = 8, 128, 128


def compile_step(layers: int, remat: str | None) -> dict:
    """Lowers and compiles the DPO step; returns XLA's memory accounting and the times."""
    import jax
    import numpy as np
    from flax import nnx
    from transformers import LlamaConfig

    from alignax.data import TokenizedExample
    from alignax.data.batching import collate
    from alignax.models import create
    from alignax.objectives import DPO
    from alignax.training.mesh import global_batch, make_mesh
    from alignax.training.state import (OptimizerConfig, create_train_state, make_optimizer,
                                        split_model)
    from alignax.training.step import StepConfig, make_train_step

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         intermediate_size=MLP, max_position_embeddings=PROMPT + RESPONSE,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                         pad_token_id=0)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, params, rest = split_model(create(config, rngs=nnx.Rngs(0)))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    reference = jax.tree.map(lambda x: x.copy(), state.params)
    step = make_train_step(graphdef, DPO(beta=0.1),
                           optimizer, schedule, mesh=mesh, state_shardings=shardings,
                           model_state=rest, config=StepConfig(remat=remat, chunk_size=512,
                                                               vocab_chunk_size=4096))
    rng = np.random.default_rng(0)
    eos = np.ones(1, np.int32)
    examples = [TokenizedExample(
        index=i, prompt_ids=rng.integers(2, VOCAB, PROMPT).astype(np.int32),
        responses={role: (np.concatenate([rng.integers(2, VOCAB, RESPONSE - 1), eos]
                                         ).astype(np.int32),) for role in ("chosen", "rejected")},
        rewards={}, bin=None) for i in range(PAIRS)]
    batch = global_batch(collate(examples, buckets=(PROMPT + RESPONSE,), prompt_buckets=(PROMPT,),
                                 pad_token_id=0), mesh)
    if batch["chosen_input_ids"].shape != (PAIRS, PROMPT + RESPONSE):
        raise RuntimeError(f"batch is {batch['chosen_input_ids'].shape}")
    began = time.perf_counter()
    lowered = step.lower(state, batch, reference)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    return {"layers": layers, "remat": remat, "lower_s": lowered_at - began,
            "compile_s": done - lowered_at, "lower_compile_s": done - began,
            "temp_bytes": memory.temp_size_in_bytes,
            "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes}


def measure(layers: int, remat: str | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", str(layers),
               "none" if remat is None else remat]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"layers={layers} remat={remat} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,8,32", help="depths of the memory table")
    parser.add_argument("--remats", default="none,dots,full", help="policies of the table")
    parser.add_argument("--compile-layers", default="4,32",
                        help="depths whose remat=None compile time is compared ('' skips)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh-process compiles per depth for the comparison (median)")
    parser.add_argument("--child", nargs=2, metavar=("LAYERS", "REMAT"))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        layers, remat = int(args.child[0]), args.child[1]
        print(json.dumps(compile_step(layers, None if remat == "none" else remat)))
        return
    remats = [None if r == "none" else r for r in args.remats.split(",")]
    runs = {}
    for layers in (int(x) for x in args.layers.split(",") if x):
        for remat in remats:
            runs[(layers, remat)] = measure(layers, remat)
    compile_layers = [int(x) for x in args.compile_layers.split(",") if x]
    compile_times = {layers: [] for layers in compile_layers}
    for _ in range(args.repeats):  # alternating depths, so load drifts hit both alike
        for layers in compile_layers:
            run = measure(layers, None)
            runs.setdefault((layers, None), run)
            compile_times[layers].append(run["lower_compile_s"])
    mib = 2.0 ** 20
    print(f"DPO step, Llama hidden {HIDDEN}, {PAIRS} x {PROMPT + RESPONSE} tokens per role, "
          f"vocab {VOCAB}, float32; load average {os.getloadavg()[0]:.1f}")
    print("| layers | remat | temp (MiB) | temp / remat=None | argument (MiB) | "
          "lower + compile (s) |")
    print("|---|---|---|---|---|---|")
    for (layers, remat), r in sorted(runs.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        base = runs.get((layers, None))
        ratio = f"{r['temp_bytes'] / base['temp_bytes']:.2f}" if base else ""
        print(f"| {layers} | {remat} | {r['temp_bytes'] / mib:.1f} | {ratio} | "
              f"{r['argument_bytes'] / mib:.1f} | {r['lower_compile_s']:.1f} |")
    report = {"benchmark": "scale_core", "load_average": os.getloadavg(),
              "runs": [r for _, r in sorted(runs.items(), key=lambda kv: (kv[0][0],
                                                                         str(kv[0][1])))]}
    if len(compile_layers) == 2:
        low, high = (statistics.median(compile_times[n]) for n in compile_layers)
        report["compile_ratio"] = {"layers": compile_layers, "ratio": high / low,
                                   "lower_compile_s": compile_times}
        print(f"remat=None lower + compile, median of {args.repeats} fresh processes: "
              f"{low:.1f} s at {compile_layers[0]} layers, {high:.1f} s at "
              f"{compile_layers[1]} layers ({high / low:.2f}x)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
