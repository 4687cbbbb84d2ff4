"""Memory of a LoRA DPO step against full fine-tuning with a frozen reference copy, 1B-shaped.

    .venv/bin/python benchmarks/lora_memory.py            # the BUILD.md table
    .venv/bin/python benchmarks/lora_memory.py --layers 2 # a quick look

A Llama with hidden 2048, 16 layers, 32 heads (8 KV heads), MLP 5632, vocab 32000, untied
embeddings (0.85B parameters), one DPO step of `alignax.training.step.make_train_step` on 4
pairs of 256 prompt + 256 response tokens (4 x 512 tokens per role), bf16 compute, per-layer
remat "full", AdamW + clipping, on one device:

- full: float32 master weights trained by AdamW (two float32 moments) and a frozen float32
  reference copy passed every step (`reference="model"`).
- lora: the base weights frozen in bf16, rank-64 (alpha 128) float32 adapters on q, k, v, o,
  gate, up and down with their float32 AdamW moments; the reference is the base model with the
  adapters off (`reference="base"`), no copy.

Nothing is allocated: the model is built with `nnx.eval_shape`, the step is lowered on
`jax.ShapeDtypeStruct`s and compiled, and the numbers are XLA's accounting of the compiled
program (`compiled.memory_analysis()`): arguments (weights, optimizer state, reference, batch),
temporaries (activations), outputs less the donated buffers; total = argument + output -
alias + temp, the same peak estimate as `alignax plan`. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB = 2048, 16, 32, 8, 5632, 32000
PAIRS, PROMPT, RESPONSE = 4, 256, 256
RANK, ALPHA = 64, 128
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def step_memory(kind: str, layers: int) -> dict:
    """XLA's memory accounting of the compiled DPO step of `kind` ("full" or "lora")."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from transformers import LlamaConfig

    from alignax.data import TokenizedExample
    from alignax.data.batching import collate
    from alignax.models.lora import LoRAConfig, add_lora
    from alignax.models.registry import FAMILY_CLASSES
    from alignax.objectives import DPO
    from alignax.training.mesh import batch_sharding, make_mesh
    from alignax.training.state import (OptimizerConfig, TrainState, make_optimizer,
                                        split_model, state_shardings)
    from alignax.training.step import StepConfig, make_train_step

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         intermediate_size=MLP, max_position_embeddings=PROMPT + RESPONSE,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                         pad_token_id=0)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    llama = FAMILY_CLASSES["llama"]

    def build():
        if kind == "full":
            return llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                         dtype=jnp.bfloat16)
        model = llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
        return add_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, targets=TARGETS),
                        rngs=nnx.Rngs(1))

    graphdef, params, rest = split_model(nnx.eval_shape(build))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-5))
    shardings = state_shardings(params, optimizer, mesh)

    def abstract(tree, tree_shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, tree_shardings)

    state = TrainState(params=abstract(params, shardings.params),
                       opt_state=abstract(jax.eval_shape(optimizer.init, params),
                                          shardings.opt_state),
                       step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                       key=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.key))
    step = make_train_step(graphdef, DPO(beta=0.1), optimizer, schedule, mesh=mesh,
                           state_shardings=shardings, model_state=rest,
                           config=StepConfig(remat="full", compute_dtype="bfloat16",
                                             chunk_size=512),
                           reference="model" if kind == "full" else "base")
    ones = np.ones(RESPONSE, np.int32)
    examples = [TokenizedExample(index=i, prompt_ids=np.ones(PROMPT, np.int32),
                                 responses={"chosen": (ones,), "rejected": (ones,)},
                                 rewards={}, bin=None) for i in range(PAIRS)]
    host = step.check_batch(collate(examples, buckets=(PROMPT + RESPONSE,),
                                    prompt_buckets=(PROMPT,), pad_token_id=0))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
             for k, v in host.items()}
    reference = state.params if step.needs_reference_params else None
    memory = step.lower(state, batch, reference).compile().memory_analysis()

    def size(tree):
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree))

    out = {"trained": size(params), "frozen": size(rest), "optimizer": size(state.opt_state),
           "reference": size(reference) if reference is not None else 0,
           "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves((params, rest)))}
    out.update({name: int(getattr(memory, f"{name}_size_in_bytes"))
                for name in ("argument", "output", "alias", "temp")})
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LAYERS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows = {kind: step_memory(kind, args.layers) for kind in ("full", "lora")}
    gib = 2 ** 30
    columns = ("trained", "frozen", "optimizer", "reference", "temp", "total")
    print(f"DPO step, Llama hidden {HIDDEN}, {args.layers} layers, vocab {VOCAB} "
          f"({rows['full']['parameters'] / 1e9:.2f}B parameters), {PAIRS} x "
          f"{PROMPT + RESPONSE} tokens per role, bf16 compute, remat full; GiB (XLA)\n")
    print("| step | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for kind, row in rows.items():
        print(f"| {kind} | " + " | ".join(f"{row[c] / gib:.2f}" for c in columns) + " |")
    ratio = rows["lora"]["total"] / rows["full"]["total"]
    print(f"\nlora / full total: {ratio:.3f}x (goal <= 0.4x)")
    print(json.dumps({"layers": args.layers, "rows": rows, "lora_over_full": ratio}))


if __name__ == "__main__":
    main()
