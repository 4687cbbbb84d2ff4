"""The `alignax` command: train / eval / label / plan a config, any field overridable.

    alignax train CONFIG [--FIELD VALUE ...]
    alignax eval  CONFIG [--FIELD VALUE ...]
    alignax label CONFIG [--FIELD VALUE ...]
    alignax plan  CONFIG [--devices N] [--json] [--FIELD VALUE ...]

CONFIG is a Python file that defines `config` (a `RunConfig`; a `LabelConfig` for label), or
"file.py:name" for another variable; the file is run as a script, so it may compute its
config. Fields are overridden by their dotted path with tyro (https://brentyi.github.io/tyro),
as Python spells them: `--train.steps 200 --train.mesh 2 2 2 --data.eval_fraction 0.05
--train.progress False`. The objective is a choice among the registered objectives:
`objective:ipo --objective.tau 0.5` switches to IPO, `--objective.beta 0.2` changes the
configured one's field; a hyper-parameter may be a schedule, `--objective.beta
"Linear(0.5, 0.1, transition_steps=1000)"` (`alignax.schedules`: Constant, Linear, Cosine).
`alignax train --help` lists every field. Without CONFIG every required field comes from the
flags (`--run_dir`). A config that fails validation (`--train.steps 0`, a mesh the devices
cannot hold, a missing local path, an unknown field) is refused before any model or data
loads. The experiments (`python -m experiments.NAME --FIELD VALUE`) parse their configs with
the same `parse_config`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any, Sequence, TypeVar

import tyro

from alignax import schedules
from alignax.trainer.config import LabelConfig, RunConfig, check_devices, load_config_file

Config = TypeVar("Config")

COMMANDS = ("train", "eval", "label", "plan")

REGISTRY = tyro.constructors.ConstructorRegistry()
"""tyro rules for alignax types: a hyper-parameter (`alignax.schedules.Hyper`) is a number or a
schedule written as a call, e.g. "Linear(0.5, 0.1, transition_steps=1000)"."""


def parse_hyper(text: str) -> schedules.Hyper:
    """"0.1" -> 0.1; "Cosine(1.0, 0.0, decay_steps=10)" -> that schedule (literal arguments
    only; nothing is evaluated).

    >>> parse_hyper("Linear(0.5, 0.1, transition_steps=1000)")
    Linear(init_value=0.5, end_value=0.1, transition_steps=1000, transition_begin=0)
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in schedules.SCHEDULES:
                raise ValueError(f"unknown schedule {node.func.id!r}; use one of "
                                 f"{sorted(schedules.SCHEDULES)}")
            return schedules.SCHEDULES[node.func.id](
                *[ast.literal_eval(a) for a in node.args],
                **{k.arg: ast.literal_eval(k.value) for k in node.keywords})
        value = ast.literal_eval(node)
    except (SyntaxError, TypeError) as error:
        raise ValueError(f"not a number or a schedule call: {text!r} ({error})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number or a schedule call: {text!r}")
    return float(value)


@REGISTRY.primitive_rule
def _hyper_rule(info):
    if info.type != schedules.Hyper:
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="FLOAT|SCHEDULE", instance_from_str=lambda args: parse_hyper(args[0]),
        is_instance=lambda x: not isinstance(x, bool) and (isinstance(x, (int, float))
                                                            or callable(x)),
        str_from_instance=lambda x: [repr(x)])


def parse_config(cls: type[Config], argv: Sequence[str] | None = None, *,
                 default: Config | None = None, prog: str | None = None) -> Config:
    """`default` (or `cls()`'s defaults) with the fields given in `argv` replaced (tyro).

    Raises:
      SystemExit: an unknown field or an unparsable value (tyro's message on stderr).
      ValueError / TypeError: the resulting config fails its own validation.
    """
    kwargs = {} if default is None else {"default": default}
    return tyro.cli(cls, args=list(argv or []), prog=prog, registry=REGISTRY,
                    use_underscores=True,
                    config=(tyro.conf.CascadeSubcommandArgs, tyro.conf.FlagConversionOff),
                    **kwargs)


def load(command: str, argv: Sequence[str]) -> tuple[Any, argparse.Namespace]:
    """(the command's config, the command's own options), everything validated: the config
    file, the overrides and, for train / eval, the mesh against the visible devices."""
    argv = list(argv)
    config_file = argv.pop(0) if argv and not argv[0].startswith("-") else None
    outer = argparse.ArgumentParser(prog=f"alignax {command}", add_help=False)
    if command == "plan":
        outer.add_argument("--devices", type=int, default=None)
        outer.add_argument("--json", action="store_true")
    options, rest = outer.parse_known_args(argv)
    options.config = config_file
    cls = LabelConfig if command == "label" else RunConfig
    default = None if options.config is None else load_config_file(options.config, expected=cls)
    config = parse_config(cls, rest, default=default, prog=f"alignax {command}")
    return config, options


def parse(argv: Sequence[str]) -> tuple[str, Any, argparse.Namespace, list[str]]:
    """(command, its validated config, its own options, the arguments after the command).

    Raises:
      SystemExit: no or an unknown command, an unknown field or an unparsable value.
      ValueError / TypeError: the config fails validation (including, for train and eval, a
        mesh the visible devices cannot hold), before any model or data loads.
    """
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        raise SystemExit(2)
    command, args = argv[0], list(argv[1:])
    config, options = load(command, args)
    if command in ("train", "eval"):
        import jax

        check_devices(config, jax.device_count())
    return command, config, options, args


def run(command: str, config: Any, options: argparse.Namespace, args: Sequence[str]) -> Any:
    """Runs a parsed command; returns its result (a TrainResult, the evaluation dict, the
    labelled file's path, or the plan dict)."""
    if command == "label":
        from alignax.trainer.label import label

        path = label(config)
        print(path)
        return path
    if command == "plan":
        import jax

        from alignax.trainer.plan import format_plan, plan, plan_devices

        if options.devices is not None and options.devices != jax.device_count():
            inner = [a for a in args if a != "--json"]
            index = inner.index("--devices")
            result = plan_devices(inner[:index] + inner[index + 2:], options.devices)
        else:
            result = plan(config)
        print(json.dumps(result) if options.json else format_plan(result))
        return result
    if command == "train":
        from alignax.trainer.train import train

        result = train(config)
        print(json.dumps({"run_dir": str(result.run_dir), "step": int(result.state.step),
                          "stopped_early": result.stopped_early,
                          "export_dir": None if result.export_dir is None else
                          str(result.export_dir),
                          "metrics": result.metrics}))
        return result
    from alignax.trainer.evaluate import evaluate

    result = evaluate(config)
    print(result["report"].read_text())
    return result


def main(argv: Sequence[str] | None = None) -> Any:
    """`alignax COMMAND ...` (module docstring): `parse` then `run`; errors propagate."""
    return run(*parse(list(sys.argv[1:] if argv is None else argv)))


def console() -> None:
    """The `alignax` console script: `main`, with a config that fails validation reported
    in one line (exit status 2) instead of a traceback."""
    try:
        parsed = parse(sys.argv[1:])
    except (ValueError, TypeError) as error:
        print(f"alignax: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    run(*parsed)


if __name__ == "__main__":
    console()
