"""One PPO iteration (rollout, scoring, update) per phase, and proof that nothing recompiles.

    .venv/bin/python benchmarks/ppo.py                      # embedded tiny model, CPU-sized
    .venv/bin/python benchmarks/ppo.py --iterations 3 --prompts 16
    python benchmarks/ppo.py --preset gpu-1b                # TinyLlama-1.1B shape, bf16 (GPU)

The policy is `alignax.models.tiny_config("llama", vocab_size=1024)` (2 layers, hidden 64,
the embedded tokenizer's vocabulary) with a separate critic copied from it, PPO(reward) under
reverse KL with the adaptive controller, and a programmatic reward on the host (the share of
response tokens with an even id; its cost is the "reward" phase). Phases, each timed with
`block_until_ready`:

    generate  KV-cache sampling of the responses (`alignax.models.generate`)
    score     per-token log-probs of the policy and the reference, the critic's values
    reward    the reward function
    update    PPO epochs x minibatches (one jitted, donated step)

One warm-up iteration compiles everything; the next `--iterations` are timed (medians). The
generation, scoring and update functions are built with `max_traces=1` (a second trace would
raise) and their jit caches are read before and after the timed iterations. The update's
model FLOPs are counted as 6 N T per epoch (Kaplan et al., 2020): N the parameters of policy
and critic that enter matmuls (all but the input embedding tables: the presets are untied
Llamas, and the critic, a copy of the policy, has no output projection), T the tokens of the
rollout batch (prompt + response columns; attention's T^2 term and the chunked log-probs'
recomputation left out). XLA's `cost_analysis()` is no use here: it counts the body of the update's loops
(epochs x minibatches, vocabulary chunks) once. With `--peak-tflops` (or a known GPU) the
table adds the update's model FLOP utilisation. Prints a table and one JSON line.
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

from alignax.models import create, tiny_config
from alignax.rl import (ActorCritic, Critic, FunctionReward, KLControllerConfig, PenaltyConfig,
                        PPOConfig, PPOTrainer, RolloutConfig, make_ppo_optimizer)
from alignax.rl.trainer import PHASES
from alignax.training.mesh import make_mesh
from alignax.training.state import OptimizerConfig

PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0}  # dense bf16, by device-kind prefix
PRESETS = {
    "cpu": dict(model=dict(), prompts=32, prompt_len=16, new_tokens=32, dtype="float32"),
    "gpu-1b": dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                              num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                              max_position_embeddings=2048),
                   prompts=64, prompt_len=128, new_tokens=128, dtype="bfloat16"),
}


def even_token_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Host-side programmatic reward: share of response tokens with an even id."""
    return ((response_ids % 2 == 0) & response_mask).sum(-1) / np.maximum(
        response_mask.sum(-1), 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    preset = PRESETS[args.preset]
    prompts = args.prompts or preset["prompts"]
    new_tokens = args.new_tokens or preset["new_tokens"]
    prompt_len = preset["prompt_len"]
    config_kwargs = {"vocab_size": 1024, **preset["model"]}
    model_config = tiny_config("llama", **config_kwargs)
    dtype = jnp.dtype(preset["dtype"])

    mesh = make_mesh()
    policy = create(model_config, rngs=nnx.Rngs(0), mesh=mesh, dtype=dtype)
    config = PPOConfig(penalty=PenaltyConfig("reverse_kl"),
                       kl=KLControllerConfig(init_coef=0.05, target=6.0),
                       rollout=RolloutConfig(max_new_tokens=new_tokens),
                       epochs=args.epochs, minibatches=args.minibatches,
                       compute_dtype=preset["dtype"],
                       remat="dots" if args.preset != "cpu" else None)
    trainer = PPOTrainer(ActorCritic(policy, Critic.from_policy(policy)),
                         FunctionReward(even_token_reward), config=config, mesh=mesh,
                         optimizer=make_ppo_optimizer(OptimizerConfig(learning_rate=1e-5)),
                         max_traces=1)
    state = trainer.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(3, model_config.vocab_size, (prompts, prompt_len)),
                             jnp.int32)
    prompt_mask = jnp.ones((prompts, prompt_len), bool)

    began = time.perf_counter()
    state, _ = trainer.iteration(state, prompt_ids, prompt_mask)  # compiles every phase
    warmup = time.perf_counter() - began
    caches = {name: fn._cache_size() for name, fn in
              (("generate", trainer._generate), ("score", trainer._score),
               ("update", trainer._update))}
    num_params = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(
        state.train.params)[0] if "embed_tokens" not in jax.tree_util.keystr(path))
    flops = 6.0 * num_params * prompts * (prompt_len + new_tokens) * args.epochs
    times = {phase: [] for phase in PHASES}
    for _ in range(args.iterations):
        state, metrics = trainer.iteration(state, prompt_ids, prompt_mask)
        for phase in PHASES:
            times[phase].append(metrics[f"time/{phase}"])
    after = {name: fn._cache_size() for name, fn in
             (("generate", trainer._generate), ("score", trainer._score),
              ("update", trainer._update))}
    medians = {phase: float(np.median(t)) for phase, t in times.items()}
    total = sum(medians.values())
    device = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.startswith(k)),
                                    None)
    update_flops_per_s = flops / medians["update"]
    mfu = None if peak is None else update_flops_per_s / (peak * 1e12 * len(jax.devices()))

    print(f"device: {device} x {len(jax.devices())}; model: {model_config.num_hidden_layers} "
          f"layers, hidden {model_config.hidden_size}, vocab {model_config.vocab_size}; "
          f"{prompts} prompts x {prompt_len} tokens -> {new_tokens} new tokens; "
          f"{args.epochs} epochs x {args.minibatches} minibatches; warm-up iteration "
          f"{warmup:.1f} s")
    print(f"{'phase':10s} {'median ms':>10s} {'share':>7s}")
    for phase in PHASES:
        print(f"{phase:10s} {1e3 * medians[phase]:10.1f} {medians[phase] / total:7.1%}")
    print(f"{'iteration':10s} {1e3 * total:10.1f} {1:7.0%}")
    print(f"samples/s (responses per iteration / iteration time): {prompts / total:.1f}; "
          f"update: {update_flops_per_s / 1e9:.2f} GFLOP/s of 6 N T model FLOPs "
          f"(N = {num_params / 1e6:.3f} M matmul parameters)"
          + ("" if mfu is None else f", MFU {mfu:.1%}"))
    print(f"jit cache entries after warm-up {caches} and after {args.iterations} iterations "
          f"{after}: {'no recompilation' if caches == after else 'RECOMPILED'}")
    print(json.dumps({
        "benchmark": "ppo", "preset": args.preset, "device": device,
        "num_devices": len(jax.devices()), "platform": platform.machine(),
        "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "epochs": args.epochs, "minibatches": args.minibatches,
        "phase_ms": {p: 1e3 * m for p, m in medians.items()},
        "phase_share": {p: m / total for p, m in medians.items()},
        "iteration_ms": 1e3 * total, "warmup_s": warmup, "samples_per_s": prompts / total,
        "num_params": num_params, "update_model_flops": flops, "update_flops_per_s": update_flops_per_s, "update_mfu": mfu,
        "jit_cache_before": caches, "jit_cache_after": after,
        "recompiled": caches != after}))


if __name__ == "__main__":
    main()
