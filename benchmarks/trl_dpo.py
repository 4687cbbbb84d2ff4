"""alignax's DPO train step vs Hugging Face TRL's `DPOTrainer`, side by side on this CPU.

    .venv/bin/python benchmarks/trl_dpo.py                 # vocab 4096 and 32768, both frameworks
    .venv/bin/python benchmarks/trl_dpo.py --vocabs 4096 --steps 8

Same model and settings in both: a Llama with hidden 256, 4 layers, 8 heads, 4 KV heads, MLP
688 (vocab 4096, plus a 32k variant); 8 preference pairs of 64 prompt + 64 response tokens
(chosen and rejected scored in one concatenated [16, 128] forward pass in both); float32;
AdamW with global-norm clipping 1.0; beta 0.1; the frozen reference recomputed every step;
TRL with gradient checkpointing off. Each framework runs in its own subprocess, so its peak
resident memory (ru_maxrss) is its own. Timings are per optimizer step after `--warmup` steps:
the median gives tokens/s (policy tokens per step / step time). "compile" is alignax's first
step (trace + XLA compile + run) and TRL's first step (no compile: eager warm-up).

Achieved FLOP/s counts the model FLOPs of a step analytically (policy forward + backward = 3x
forward, plus one reference forward: 4 forward passes; a forward pass costs 2 FLOPs per
multiply-add of every matmul, attention scores and values included over the full 128x128
window) and divides by the median step time; the peak is the best float32 2048^3 matmul
FLOP/s measured during the run (XLA in the alignax subprocesses, torch in the TRL ones, after
each timed run). On a shared machine the load changes between measurements; the fraction is
only meaningful on an otherwise idle machine. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP = 256, 4, 8, 4, 688
PAIRS, PROMPT, RESPONSE = 8, 64, 64
BETA, LR = 0.1, 1e-6


def llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       intermediate_size=MLP, max_position_embeddings=PROMPT + RESPONSE,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                       pad_token_id=0)


def forward_flops(vocab: int, sequences: int, length: int) -> float:
    """Matmul FLOPs of one forward pass over [sequences, length] tokens."""
    head_dim = HIDDEN // HEADS
    per_token = 2 * (HIDDEN * HEADS * head_dim + 2 * HIDDEN * KV_HEADS * head_dim  # q, k, v
                     + HEADS * head_dim * HIDDEN + 3 * HIDDEN * MLP) * LAYERS      # o, mlp
    per_token += 2 * 2 * length * HEADS * head_dim * LAYERS  # scores + weighted values
    per_token += 2 * HIDDEN * vocab  # lm head
    return float(per_token * sequences * length)


def step_flops(vocab: int) -> float:
    """policy forward + backward (3 forwards) + reference forward = 4 forward passes."""
    return 4 * forward_flops(vocab, 2 * PAIRS, PROMPT + RESPONSE)


def token_batch(vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, vocab, (PAIRS, PROMPT))
    return prompt, rng.integers(2, vocab, (PAIRS, RESPONSE - 1)), rng.integers(2, vocab, (PAIRS, RESPONSE - 1))


# --------------------------------------------------------------------------- alignax

def run_alignax(vocab: int, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from alignax.models import create
    from alignax.training.mesh import global_batch, make_mesh
    from alignax.training.objectives import ObjectiveConfig, make_objective
    from alignax.training.state import (OptimizerConfig, create_train_state, make_optimizer,
                                        split_model)
    from alignax.training.step import StepConfig, make_train_step

    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, params, rest = split_model(create(llama_config(vocab), rngs=nnx.Rngs(0)))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=LR, max_grad_norm=1.0))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    reference = jax.tree.map(lambda x: x.copy(), state.params)
    step = make_train_step(graphdef, make_objective(ObjectiveConfig(name="dpo", beta=BETA)),
                           optimizer, schedule, mesh=mesh, state_shardings=shardings,
                           model_state=rest,
                           config=StepConfig(chunk_size=512, vocab_chunk_size=4096))
    prompt, chosen, rejected = token_batch(vocab)
    length = PROMPT + RESPONSE
    batch = {}
    for role, response in (("chosen", chosen), ("rejected", rejected)):
        ids = np.concatenate([prompt, response, np.ones((PAIRS, 1), int)], 1).astype(np.int32)  # + eos
        batch[f"{role}_input_ids"] = ids
        batch[f"{role}_attention_mask"] = np.ones_like(ids)
        batch[f"{role}_loss_mask"] = np.arange(length)[None].repeat(PAIRS, 0) >= PROMPT
    batch = global_batch(batch, mesh)
    times = []
    for _ in range(warmup + steps):
        began = time.perf_counter()
        state, metrics = step(state, batch, reference)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - began)
    return {"first_step_s": times[0], "step_times": times[warmup:],
            "loss": float(metrics["loss"])}


# --------------------------------------------------------------------------- TRL

def word_tokenizer(vocab: int):
    """A word-level tokenizer "w0".."w{V-1}": text of k words is exactly k tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", eos_token="w1",
                                   unk_token="w0")


def run_trl(vocab: int, steps: int, warmup: int) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab)).float()
    reference = copy.deepcopy(model).eval()
    prompt, chosen, rejected = token_batch(vocab)
    words = lambda row: " ".join(f"w{i}" for i in row)  # noqa: E731
    dataset = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c),
                                  "rejected": " " + words(r)}
                                 for p, c, r in zip(prompt, chosen, rejected)] * (warmup + steps))

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.began)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=PAIRS, max_steps=warmup + steps,
                         learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch",
                         max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
                         activation_checkpointing=False, use_cpu=True, bf16=False,
                         precompute_ref_log_probs=False, max_length=PROMPT + RESPONSE,
                         report_to="none", save_strategy="no", logging_steps=10 ** 6,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0)
        timer = Timer()
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=word_tokenizer(vocab), callbacks=[timer])
        batch = next(iter(trainer.get_train_dataloader()))
        shape = tuple(batch["input_ids"].shape)
        if shape != (2 * PAIRS, PROMPT + RESPONSE):
            raise RuntimeError(f"TRL batch is {shape}, expected {(2 * PAIRS, PROMPT + RESPONSE)}")
        trainer.train()
    return {"first_step_s": timer.times[0], "step_times": timer.times[warmup:],
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- peak and driver

def matmul_peak(framework: str) -> float:
    """Best float32 FLOP/s of a 2048^3 matmul in this process (XLA for alignax, torch for TRL;
    best of 7 after a warm-up). The driver takes the max over all measurements of the run."""
    n = 2048
    if framework == "alignax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        matmul = jax.jit(lambda x: x @ x)
        run = lambda: matmul(a).block_until_ready()  # noqa: E731
    else:
        import torch

        t = torch.randn(n, n)
        run = lambda: torch.mm(t, t)  # noqa: E731
    run()
    times = []
    for _ in range(7):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return 2 * n ** 3 / min(times)


def child(framework: str, vocab: int, steps: int, warmup: int) -> dict:
    result = {"alignax": run_alignax, "trl": run_trl}[framework](vocab, steps, warmup)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["matmul_flops"] = matmul_peak(framework)  # after the RSS reading: not counted in it
    return result


def measure(framework: str, vocab: int, steps: int, warmup: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", framework,
               "--vocabs", str(vocab), "--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{framework} (vocab {vocab}) failed:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="4096,32768")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", choices=("alignax", "trl"))
    args = parser.parse_args()
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if args.child:
        print(json.dumps(child(args.child, vocabs[0], args.steps, args.warmup)))
        return
    tokens = 2 * PAIRS * (PROMPT + RESPONSE)
    rows, report = [], {"benchmark": "trl_dpo", "tokens_per_step": tokens,
                        "load_average_start": os.getloadavg(), "cpus": os.cpu_count(),
                        "results": {}}
    peaks = []
    for vocab in vocabs:
        entry = {}
        for framework in ("alignax", "trl"):
            result = measure(framework, vocab, args.steps, args.warmup)
            peaks.append(result["matmul_flops"])
            median = statistics.median(result["step_times"])
            entry[framework] = {"tokens_per_s": tokens / median, "median_step_s": median,
                                "first_step_s": result["first_step_s"],
                                "peak_rss_mib": result["peak_rss_mib"],
                                "flops": step_flops(vocab) / median}
            rows.append((vocab, framework, entry[framework]))
        entry["speedup"] = entry["alignax"]["tokens_per_s"] / entry["trl"]["tokens_per_s"]
        report["results"][str(vocab)] = entry
    peak = max(peaks)
    for _, _, r in rows:
        r["fraction_of_peak"] = r["flops"] / peak
    report["matmul_peak_flops"] = peak
    report["load_average_end"] = os.getloadavg()
    print(f"float32 matmul peak on this CPU: {peak / 1e9:.1f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f}; {tokens} tokens per step")
    print(f"| vocab | framework | tokens/s | median step (s) | first step / compile (s) | "
          f"peak RSS (MiB) | GFLOP/s | of peak | alignax / TRL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab, framework, r in rows:
        ratio = f"{report['results'][str(vocab)]['speedup']:.2f}x" if framework == "alignax" else ""
        print(f"| {vocab} | {framework} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} | "
              f"{r['first_step_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['flops'] / 1e9:.1f} | "
              f"{r['fraction_of_peak']:.1%} | {ratio} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
