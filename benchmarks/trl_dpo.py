"""alignax's DPO train step vs Hugging Face TRL's `DPOTrainer`, side by side on one machine.

    .venv/bin/python benchmarks/trl_dpo.py                 # CPU preset: vocab 4096 and 32768
    .venv/bin/python benchmarks/trl_dpo.py --vocabs 4096 --steps 8
    python benchmarks/trl_dpo.py --preset gpu-1b           # on a GPU: ~1B Llama, bf16, seq 1024

Same model and settings in both. The "cpu" preset: a Llama with hidden 256, 4 layers, 8
heads, 4 KV heads, MLP 688 (vocab 4096, plus a 32k variant); 8 preference pairs of 64 prompt
+ 64 response tokens; float32. The "gpu-1b" preset: a TinyLlama-1.1B-shaped Llama (hidden
2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000), 8 pairs of 512 + 512 tokens,
bfloat16 compute with float32 master weights in both (alignax `compute_dtype="bfloat16"`,
TRL `bf16=True` autocast), alignax with `remat="dots"` (matmul outputs kept, attention
probabilities recomputed, as torch's flash attention does). Both: AdamW with global-norm
clipping 1.0; beta 0.1; the frozen reference recomputed every step; TRL with gradient
checkpointing off.

alignax runs twice: on the batch's unpacked rows ([16, 128] chosen and rejected rows, as TRL
concatenates them), and with `StepConfig(share_prompt=True)`, where each pair's prompt is run
once and both responses follow it in one packed row (`alignax.data.batching`). Both read the
same `collate`d batch; the token count (tokens/s) is the unpacked one for every row, so the
rows compare throughput on the same data. Each run is its own subprocess, so its peak
resident memory (ru_maxrss) is its own. Timings are per optimizer step after `--warmup`
steps: the median gives tokens/s. "compile" is alignax's first step (trace + XLA compile +
run) and TRL's first step (no compile: eager warm-up).

Achieved FLOP/s counts the model FLOPs of the UNPACKED step analytically (policy forward +
backward = 3x forward, plus one reference forward: 4 forward passes; a forward pass costs 2
FLOPs per multiply-add of every matmul, attention scores and values included over the full
window) and divides by the median step time, so a row that skips work (shared prompt) shows
a higher "useful" FLOP/s. The peak is the best 2048^3 (CPU, float32) or 8192^3 (GPU,
bfloat16) matmul FLOP/s measured in the run (XLA for alignax, torch for TRL); on a GPU the
table adds MFU against the device's nominal dense bf16 peak (`NOMINAL_PEAK`, or
--peak-tflops). On a shared machine the load changes between measurements; the fractions
are only meaningful on an otherwise idle machine. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocabs: str  # default --vocabs
    pairs: int
    prompt: int
    response: int
    dtype: str  # compute dtype; master weights are float32 in both frameworks
    chunk_size: int  # alignax chunked log-prob blocks
    vocab_chunk_size: int
    remat: str | None = None  # alignax StepConfig.remat (extra recompute: only slows alignax)


PRESETS = {
    "cpu": Preset(hidden=256, layers=4, heads=8, kv_heads=4, mlp=688, vocabs="4096,32768",
                  pairs=8, prompt=64, response=64, dtype="float32", chunk_size=512,
                  vocab_chunk_size=4096),
    "gpu-1b": Preset(hidden=2048, layers=22, heads=32, kv_heads=4, mlp=5632, vocabs="32000",
                     pairs=8, prompt=512, response=512, dtype="bfloat16", chunk_size=4096,
                     # alignax keeps attention probabilities for the backward pass (torch's
                     # flash SDPA recomputes them): ~1 GB per layer here, so recompute them too
                     vocab_chunk_size=32000, remat="dots"),
}
# Dense bf16 tensor-core peak FLOP/s by device name fragment (vendor data sheets, SXM parts).
NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
BETA, LR = 0.1, 1e-6


def llama_config(preset: Preset, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=preset.hidden,
                       num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                       num_key_value_heads=preset.kv_heads, intermediate_size=preset.mlp,
                       max_position_embeddings=preset.prompt + preset.response,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                       pad_token_id=0)


def forward_flops(preset: Preset, vocab: int, sequences: int, length: int) -> float:
    """Matmul FLOPs of one forward pass over [sequences, length] tokens."""
    d, head_dim = preset.hidden, preset.hidden // preset.heads
    per_token = 2 * (d * preset.heads * head_dim + 2 * d * preset.kv_heads * head_dim  # q, k, v
                     + preset.heads * head_dim * d + 3 * d * preset.mlp) * preset.layers  # o, mlp
    per_token += 2 * 2 * length * preset.heads * head_dim * preset.layers  # scores + values
    per_token += 2 * d * vocab  # lm head
    return float(per_token * sequences * length)


def step_flops(preset: Preset, vocab: int) -> float:
    """policy forward + backward (3 forwards) + reference forward = 4 forward passes."""
    return 4 * forward_flops(preset, vocab, 2 * preset.pairs, preset.prompt + preset.response)


def token_batch(preset: Preset, vocab: int, seed: int = 0):
    """Prompts [P, prompt] and chosen / rejected responses [P, response - 1] (+ eos later)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (preset.pairs, preset.response - 1)
    return (rng.integers(2, vocab, (preset.pairs, preset.prompt)), rng.integers(2, vocab, shape),
            rng.integers(2, vocab, shape))


# --------------------------------------------------------------------------- alignax

def build_alignax(preset: Preset, vocab: int, *, share_prompt: bool):
    """The DPO step, its state, the frozen reference parameters and the collated batch."""
    import jax
    import numpy as np
    from flax import nnx

    from alignax.data import TokenizedExample
    from alignax.data.batching import collate
    from alignax.models import create
    from alignax.training.mesh import global_batch, make_mesh
    from alignax.objectives import DPO
    from alignax.training.state import (OptimizerConfig, create_train_state, make_optimizer,
                                        split_model)
    from alignax.training.step import StepConfig, make_train_step

    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, params, rest = split_model(create(llama_config(preset, vocab), rngs=nnx.Rngs(0)))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=LR, max_grad_norm=1.0))
    state, shardings = create_train_state(params, optimizer, key=jax.random.PRNGKey(0), mesh=mesh)
    reference = jax.tree.map(lambda x: x.copy(), state.params)
    config = StepConfig(chunk_size=preset.chunk_size, vocab_chunk_size=preset.vocab_chunk_size,
                        compute_dtype=preset.dtype, share_prompt=share_prompt,
                        remat=preset.remat)
    step = make_train_step(graphdef, DPO(beta=BETA),
                           optimizer, schedule, mesh=mesh, state_shardings=shardings,
                           model_state=rest, config=config)
    eos = np.ones(1, np.int32)
    examples = [TokenizedExample(index=i, prompt_ids=p.astype(np.int32),
                                 responses={"chosen": (np.concatenate([c, eos]),),
                                            "rejected": (np.concatenate([r, eos]),)},
                                 rewards={}, bin=None)
                for i, (p, c, r) in enumerate(zip(*token_batch(preset, vocab)))]
    length = preset.prompt + preset.response
    batch = collate(examples, buckets=(length,), prompt_buckets=(preset.prompt,), pad_token_id=0,
                    share_prompt=share_prompt)
    return step, state, reference, global_batch(batch, mesh)


def run_alignax(preset: Preset, vocab: int, steps: int, warmup: int, *,
                share_prompt: bool) -> dict:
    import jax

    step, state, reference, batch = build_alignax(preset, vocab, share_prompt=share_prompt)
    times = []
    for _ in range(warmup + steps):
        began = time.perf_counter()
        state, metrics = step(state, batch, reference)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - began)
    return {"first_step_s": times[0], "step_times": times[warmup:],
            "loss": float(metrics["loss"]), "num_tokens": float(metrics["num_tokens"])}


# --------------------------------------------------------------------------- TRL

def word_tokenizer(vocab: int):
    """A word-level tokenizer "w0".."w{V-1}": text of k words is exactly k tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", eos_token="w1",
                                   unk_token="w0")


def run_trl(preset: Preset, vocab: int, steps: int, warmup: int) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    model = LlamaForCausalLM(llama_config(preset, vocab)).float()  # float32 master weights
    reference = copy.deepcopy(model).eval()
    prompt, chosen, rejected = token_batch(preset, vocab)
    words = lambda row: " ".join(f"w{i}" for i in row)  # noqa: E731
    dataset = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c),
                                  "rejected": " " + words(r)}
                                 for p, c, r in zip(prompt, chosen, rejected)] * (warmup + steps))

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.began)

    length = preset.prompt + preset.response
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=preset.pairs,
                         max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="constant",
                         optim="adamw_torch", max_grad_norm=1.0, beta=BETA,
                         loss_type=["sigmoid"], activation_checkpointing=False, use_cpu=not gpu,
                         bf16=preset.dtype == "bfloat16", precompute_ref_log_probs=False,
                         max_length=length, report_to="none", save_strategy="no",
                         logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0,
                         seed=0)
        timer = Timer()
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=word_tokenizer(vocab), callbacks=[timer])
        batch = next(iter(trainer.get_train_dataloader()))
        shape = tuple(batch["input_ids"].shape)
        if shape != (2 * preset.pairs, length):
            raise RuntimeError(f"TRL batch is {shape}, expected {(2 * preset.pairs, length)}")
        trainer.train()
    return {"first_step_s": timer.times[0], "step_times": timer.times[warmup:],
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- peak and driver

def matmul_peak(framework: str) -> dict:
    """Best matmul FLOP/s in this process: float32 2048^3 on a CPU, bfloat16 8192^3 on a GPU
    (XLA for alignax, torch for TRL; best of 7 after a warm-up), and the device's name."""
    if framework == "alignax":
        import jax
        import jax.numpy as jnp

        device = jax.devices()[0]
        gpu = device.platform == "gpu"
        n, dtype = (8192, jnp.bfloat16) if gpu else (2048, jnp.float32)
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        matmul = jax.jit(lambda x: x @ x)
        run = lambda: matmul(a).block_until_ready()  # noqa: E731
        name = device.device_kind
    else:
        import torch

        gpu = torch.cuda.is_available()
        n, dtype = (8192, torch.bfloat16) if gpu else (2048, torch.float32)
        t = torch.randn(n, n, dtype=dtype, device="cuda" if gpu else "cpu")
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        run = lambda: (torch.mm(t, t), sync())  # noqa: E731
        name = torch.cuda.get_device_name() if gpu else "cpu"
    run()
    times = []
    for _ in range(7):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return {"flops": 2 * n ** 3 / min(times), "device": name, "gpu": gpu}


RUNS = {  # label -> (framework, alignax share_prompt)
    "alignax": ("alignax", False),
    "alignax shared-prompt": ("alignax", True),
    "trl": ("trl", False),
}


def child(run: str, preset: Preset, vocab: int, steps: int, warmup: int) -> dict:
    framework, share = RUNS[run]
    if framework == "alignax":
        result = run_alignax(preset, vocab, steps, warmup, share_prompt=share)
    else:
        result = run_trl(preset, vocab, steps, warmup)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["matmul"] = matmul_peak(framework)  # after the RSS reading: not counted in it
    return result


def measure(run: str, preset_name: str, vocab: int, steps: int, warmup: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", run, "--preset", preset_name,
               "--vocabs", str(vocab), "--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{run} (vocab {vocab}) failed:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def nominal_peak(device: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((peak for key, peak in NOMINAL_PEAK.items() if key in device), None)



# --------------------------------------------------------------------------- cost (--cost)

def matmul_flops(jaxpr, *, branch) -> tuple[float, float]:
    """(all, unembedding) matmul FLOPs of a jaxpr: 2 per multiply-add of every dot_general,
    a scan's body times its length, a cond's branch `branch(eqn)` only (a while loop with a
    matmul inside is refused: its trip count is not in the program). "unembedding" counts
    the dots with an operand that has the vocabulary-chunk axis (`vocab_axis` below)."""
    import math

    total = lm_head = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            total += flops
            if any(branch.vocab_axis in v.aval.shape for v in eqn.invars):
                lm_head += flops
            continue
        subs = ([eqn.params["branches"][branch(eqn)]] if name == "cond" else
                [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")])
        times = eqn.params["length"] if name == "scan" else 1
        for sub in subs:
            counted = matmul_flops(getattr(sub, "jaxpr", sub), branch=branch)
            if name == "while" and counted[0]:
                raise ValueError("a while loop holds matmuls: its trip count is unknown")
            total, lm_head = total + times * counted[0], lm_head + times * counted[1]
    return total, lm_head


class ScoreBranch:
    """Which branch of the step's score-window conds (`windowed_sequence_logprobs`) to count:
    the one this batch takes (its widest response span), or the widest (every position of
    every row scored: the unpacked step before the window)."""

    def __init__(self, windows: tuple[int, ...], span: int, *, widest: bool, vocab_axis: int):
        self.windows, self.vocab_axis = windows, vocab_axis
        self.index = len(windows) - 1 if widest else min(
            i for i, w in enumerate(windows) if w >= span)

    def __call__(self, eqn) -> int:
        if len(eqn.params["branches"]) != len(self.windows):
            raise ValueError(f"unexpected cond with {len(eqn.params['branches'])} branches")
        return self.index


def cost(preset: Preset, vocab: int, *, share_prompt: bool) -> dict:
    """XLA's cost / memory analysis of the compiled step, and its matmul FLOPs counted on the
    step's jaxpr (deterministic: no timing)."""
    import jax
    import numpy as np

    from alignax.logprobs import next_token_targets
    from alignax.training.step import score_windows

    step, state, reference, batch = build_alignax(preset, vocab, share_prompt=share_prompt)
    compiled = step.lower(state, batch, reference).compile()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    arguments = (state, step.check_batch(batch), reference, step.model_state)
    jaxpr = jax.make_jaxpr(step.jitted)(*arguments).jaxpr
    length = preset.prompt + preset.response
    spans = []
    for role in ("chosen", "rejected"):
        ids, attention, loss = (np.asarray(batch[f"{role}_{k}"])
                                for k in ("input_ids", "attention_mask", "loss_mask"))
        _, mask = next_token_targets(ids, loss.astype(bool) & attention.astype(bool))
        spans.append(int(np.asarray(mask).sum(-1).max()))  # contiguous responses: span = count
    counts = {}
    for label, widest in (("window", False), ("all_positions", True)):
        branch = ScoreBranch(score_windows(length), max(spans), widest=widest,
                             vocab_axis=preset.vocab_chunk_size)
        counts[label] = matmul_flops(jaxpr, branch=branch)
    return {"xla_flops": xla.get("flops"), "xla_bytes_accessed": xla.get("bytes accessed"),
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20,
            "matmul_flops": counts["window"][0], "unembedding_flops": counts["window"][1],
            "matmul_flops_all_positions": counts["all_positions"][0],
            "unembedding_flops_all_positions": counts["all_positions"][1],
            "analytic_flops_all_positions": step_flops(preset, vocab)}


def print_cost(preset_name: str, vocabs: list[int]) -> None:
    preset = PRESETS[preset_name]
    rows = {}
    for vocab in vocabs:
        for run, (framework, share) in RUNS.items():
            if framework == "alignax":
                rows[(vocab, run)] = cost(preset, vocab, share_prompt=share)
    print("| vocab | run | matmul GFLOP/step: all positions scored (before) | response spans "
          "scored (now) | now / before | unembedding share now | XLA cost_analysis GFLOP | "
          "XLA bytes accessed (GB) | XLA temp (MiB) |")
    print("|---" * 9 + "|")
    for (vocab, run), r in rows.items():
        before = r["matmul_flops_all_positions"] if run == "alignax" else None
        print(f"| {vocab} | {run} | {before / 1e9:.2f} |" if before else f"| {vocab} | {run} | |",
              f"{r['matmul_flops'] / 1e9:.2f} |",
              f"{r['matmul_flops'] / before:.3f} |" if before else "|",
              f"{r['unembedding_flops'] / r['matmul_flops']:.1%} | {r['xla_flops'] / 1e9:.2f} | "
              f"{r['xla_bytes_accessed'] / 1e9:.2f} | {r['temp_mib']:.0f} |")
    print(json.dumps({"benchmark": "trl_dpo --cost", "preset": preset_name,
                      "results": {f"{v} {run}": r for (v, run), r in rows.items()}}))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--vocabs", default=None, help="comma-separated (default: the preset's)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"any of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="nominal bf16 peak for MFU on a GPU not in NOMINAL_PEAK")
    parser.add_argument("--cost", action="store_true",
                        help="no timing: XLA's cost / memory analysis and the jaxpr's matmul "
                             "FLOPs of alignax's steps")
    parser.add_argument("--child", choices=sorted(RUNS))
    args = parser.parse_args(argv)
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
    return args


def main() -> None:
    args = parse_args()
    preset = PRESETS[args.preset]
    vocabs = [int(v) for v in (args.vocabs or preset.vocabs).split(",")]
    if args.child:
        print(json.dumps(child(args.child, preset, vocabs[0], args.steps, args.warmup)))
        return
    if args.cost:
        print_cost(args.preset, vocabs)
        return
    runs = args.runs.split(",")
    tokens = 2 * preset.pairs * (preset.prompt + preset.response)
    rows, report = [], {"benchmark": "trl_dpo", "preset": dataclasses.asdict(preset),
                        "tokens_per_step": tokens, "load_average_start": os.getloadavg(),
                        "cpus": os.cpu_count(), "results": {}}
    peaks, devices, on_gpu = [], set(), False
    for vocab in vocabs:
        entry = {}
        for run in runs:
            result = measure(run, args.preset, vocab, args.steps, args.warmup)
            peaks.append(result["matmul"]["flops"])
            devices.add(result["matmul"]["device"])
            on_gpu |= result["matmul"]["gpu"]
            median = statistics.median(result["step_times"])
            entry[run] = {"tokens_per_s": tokens / median, "median_step_s": median,
                          "first_step_s": result["first_step_s"],
                          "peak_rss_mib": result["peak_rss_mib"],
                          "flops": step_flops(preset, vocab) / median}
            rows.append((vocab, run, entry[run]))
        if "trl" in entry:
            for run in entry:
                if run != "trl":
                    entry[run]["speedup"] = entry[run]["tokens_per_s"] / entry["trl"]["tokens_per_s"]
        report["results"][str(vocab)] = entry
    peak = max(peaks)
    nominal = nominal_peak(" ".join(sorted(devices)), args.peak_tflops) if on_gpu else None
    for _, _, r in rows:
        r["fraction_of_peak"] = r["flops"] / peak
        if nominal:
            r["mfu"] = r["flops"] / nominal
    report.update(matmul_peak_flops=peak, nominal_peak_flops=nominal, devices=sorted(devices),
                  load_average_end=os.getloadavg())
    kind = "bfloat16" if on_gpu else "float32"
    print(f"{kind} matmul peak measured: {peak / 1e9:.1f} GFLOP/s on {', '.join(sorted(devices))}; "
          f"load average {os.getloadavg()[0]:.1f}; {tokens} tokens per step")
    mfu_head = " MFU |" if nominal else ""
    print(f"| vocab | run | tokens/s | median step (s) | first step / compile (s) | "
          f"peak RSS (MiB) | GFLOP/s | of measured peak |{mfu_head} vs TRL |")
    print("|---" * (9 + bool(nominal)) + "|")
    for vocab, run, r in rows:
        ratio = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        mfu = f" {r['mfu']:.1%} |" if nominal else ""
        print(f"| {vocab} | {run} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} | "
              f"{r['first_step_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['flops'] / 1e9:.1f} | "
              f"{r['fraction_of_peak']:.1%} |{mfu} {ratio} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
