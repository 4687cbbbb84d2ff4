"""`plan(config)`: the memory a run needs per device, from abstract shapes only.

The run is built as `train` builds it, except that no weight is ever created: the model is
`nnx.eval_shape`d from its config.json, its parameters, the optimizer state (`jax.eval_shape`
of the optimizer's init), the frozen reference and a worst-case batch become
`jax.ShapeDtypeStruct`s carrying their shardings on the target mesh, and the real train step is
lowered and compiled for them (`step.lower(...).compile()`). XLA's `memory_analysis()` of the
compiled step then gives, per device, the arguments (parameters, optimizer state, reference,
batch), the outputs, the buffers donated between them, and the temporary (activation)
memory. The worst-case batch holds sequences of `max_length` tokens: a prompt of
`max_prompt_length` (default max_length // 2) tokens and responses filling the rest, in the
data's layout (pairs, groups of the data's largest size, shared-prompt packing).

A mesh needs its devices to compile. For a mesh larger than this machine's, `plan_devices`
reruns the plan in a subprocess on N simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`): the per-device shapes and shardings are
those of the target mesh; temporary memory is XLA:CPU's schedule, an estimate of an
accelerator's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models import RewardEnsemble, RewardModel
from alignax.models.lora import add_lora, default_targets
from alignax.models.partitioning import state_shardings as model_shardings
from alignax.models.registry import FAMILY_CLASSES
from alignax.models.config import ModelConfig as Architecture
from alignax.objectives.registry import REWARD_MODEL
from alignax.trainer.config import TINY, RunConfig, check_devices
from alignax.trainer.runs import Run, is_reward_checkpoint, prepare_inputs, tiny_model_config
from alignax.trainer.train import make_step
from alignax.training import TrainState, make_mesh
from alignax.training.mesh import batch_sharding, replicated
from alignax.training.state import make_optimizer, split_model, state_shardings


def abstract_model(config: RunConfig, hf_config, tokenizer) -> nnx.Module:
    """The run's model (with its LoRA adapters) with `jax.ShapeDtypeStruct` leaves (nothing
    allocated)."""
    build = _constructor(config, hf_config, tokenizer)
    model = nnx.eval_shape(build)
    lora = config.model.lora_config(targets=default_targets(model))
    if lora is None:
        return model
    return nnx.eval_shape(lambda: add_lora(build(), lora, rngs=nnx.Rngs(0)))


def _constructor(config: RunConfig, hf_config, tokenizer) -> Callable[[], nnx.Module]:
    """A function building the run's model without adapters."""
    spec = config.model
    hf = tiny_model_config(spec, tokenizer) if spec.path == TINY else hf_config
    if config.objective.needs.model != REWARD_MODEL:
        cls = FAMILY_CLASSES[Architecture.from_hf(hf).family]
        return lambda: cls(hf, rngs=nnx.Rngs(0))
    heads = spec.num_heads
    if spec.path != TINY and is_reward_checkpoint(hf):
        heads = None if int(getattr(hf, "num_labels", 1)) == 1 else int(hf.num_labels)
    if spec.ensemble:
        return lambda: RewardEnsemble.create(hf, num_members=spec.ensemble, rngs=nnx.Rngs(0),
                                             num_heads=heads)
    return lambda: RewardModel(hf, rngs=nnx.Rngs(0), num_heads=heads)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def worst_case_batch(run: Run) -> dict[str, np.ndarray]:
    """A batch of `batch_size` examples of maximal length in the data's layout."""
    data, dataset = run.config.data, run.dataset
    example = dataset.examples[0]
    prompt = min(data.max_prompt_length or data.max_length // 2, data.max_length - 1)
    response = data.max_length - prompt
    sizes = dataset.group_sizes or {role: 1 for role in example.responses}
    responses = {role: tuple(np.ones(response, np.int32) for _ in range(sizes[role]))
                 for role in example.responses}
    bins = {role: (0,) * sizes[role] for role in example.response_bins}
    longest = dataclasses.replace(
        example, prompt_ids=np.ones(prompt, np.int32), responses=responses, response_bins=bins,
        response_lengths={role: (response,) * sizes[role] for role in example.responses})
    examples = [dataclasses.replace(longest, index=i) for i in range(run.config.train.batch_size)]
    return dataset.collate(examples, share_prompt=run.share_prompt)


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (device 0's)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan(config: RunConfig) -> dict[str, Any]:
    """Compiles `config`'s train step on abstract shapes; returns the per-device memory (bytes)
    and sizes as a JSON-able dict (see the module docstring)."""
    shape = check_devices(config, jax.device_count())
    mesh = make_mesh(shape)
    inputs = prepare_inputs(config)
    model = abstract_model(config, inputs.hf_config, inputs.tokenizer)
    graphdef, params, model_state = split_model(model)
    params = _with_shardings(params, model_shardings(params, mesh))
    model_state = _with_shardings(model_state, model_shardings(model_state, mesh))
    optimizer, schedule = make_optimizer(config.train.optimizer_config())
    shardings = state_shardings(params, optimizer, mesh)
    opt_state = _with_shardings(jax.eval_shape(optimizer.init, params), shardings.opt_state)
    state = TrainState(params=params, opt_state=opt_state,
                       step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
                       key=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh)))
    run = Run(config=config, run_dir=None, mesh=mesh, tokenizer=inputs.tokenizer,
              dataset=inputs.dataset, eval_dataset=inputs.eval_dataset, graphdef=graphdef,
              params=params, model_state=model_state, reference_params=None, saved_config={})
    step = make_step(run, optimizer, schedule, shardings)
    host_batch = step.check_batch(worst_case_batch(run))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
             for k, v in host_batch.items()}
    reference = params if step.needs_reference_params else None
    compiled = step.lower(state, batch, reference).compile()
    memory = compiled.memory_analysis()
    analysis = {name: int(getattr(memory, f"{name}_size_in_bytes"))
                for name in ("argument", "output", "alias", "temp", "generated_code")}
    return {
        "objective": config.objective.name,
        "mesh": dict(mesh.shape),
        "devices": int(math.prod(shape)),
        "batch_size": config.train.batch_size,
        "max_length": config.data.max_length,
        "share_prompt": run.share_prompt,
        "parameters": int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
        "per_device_bytes": {
            "params": _bytes_per_device(params),
            "optimizer_state": _bytes_per_device(opt_state),
            "reference": _bytes_per_device(reference) if reference is not None else 0,
            "batch": _bytes_per_device(batch),
            "arguments": analysis["argument"],
            "outputs": analysis["output"],
            "donated": analysis["alias"],
            "temporary": analysis["temp"],
            "code": analysis["generated_code"],
            # live at the step's peak: inputs + outputs not aliased to inputs + temporaries
            "peak_estimate": analysis["argument"] + analysis["output"] - analysis["alias"]
            + analysis["temp"],
        },
    }


def format_plan(result: dict[str, Any]) -> str:
    """A Markdown table of `plan`'s result (GiB per device)."""
    gib = 2.0 ** 30
    lines = [f"{result['objective']} on mesh {result['mesh']} ({result['devices']} devices), "
             f"batch {result['batch_size']} x {result['max_length']} tokens, "
             f"{result['parameters']:,} parameters, share_prompt={result['share_prompt']}", "",
             "| per device | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / gib:.4f} |"
              for name, value in result["per_device_bytes"].items()]
    return "\n".join(lines)


def plan_devices(argv: Sequence[str], devices: int) -> dict[str, Any]:
    """Runs `alignax plan ARGV` in a subprocess that simulates `devices` CPU devices; returns
    its result.

    Raises:
      RuntimeError: the subprocess failed (its stderr is in the message).
    """
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "alignax.trainer.cli", "plan", *argv, "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"plan on {devices} simulated devices failed: "
                           f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
