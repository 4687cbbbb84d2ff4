"""A plain `pip install -e .` must be enough for the library: every third-party module that
alignax and the experiments import is a declared runtime dependency (or one of theirs).

The test environment holds more (torch, pytest, ...), which once hid a missing `jinja2`
(transformers needs it for chat templates; it came with torch). So a subprocess hides every
installed distribution outside the closure of pyproject.toml's `dependencies`, imports every
module of `alignax` and `experiments`, runs the conversational data path (chat template
included) and reports what it imported.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib, importlib.metadata, json, pkgutil, sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

project = tomllib.loads(open(sys.argv[1], "rb").read().decode())["project"]
own = canonicalize_name(project["name"])


def closure(requirements):
    """Installed distributions required by `requirements`, transitively, extras honoured."""
    found, stack = {}, [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        extras = found.get(name, set())
        if name in found and set(req.extras) <= extras:
            continue
        found[name] = extras | set(req.extras)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in {"", *found[name]}):
                stack.append(sub)
    return set(found)


declared = closure(project["dependencies"]) | {own}
owners = importlib.metadata.packages_distributions()
dists = lambda module: {canonicalize_name(d) for d in owners.get(module, ())}
hidden = {m for m in owners if dists(m) and not dists(m) & declared}


class Hiding:
    """Wraps a meta-path finder so that hidden modules and distributions are not found."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self.finder, "find_spec", None)
        if name.partition(".")[0] in hidden or find is None:
            return None
        return find(name, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.finder, "find_distributions", None)
        return [] if find is None else [
            d for d in find(*args, **kwargs)
            if canonicalize_name(d.metadata["Name"] or "") in declared]

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [Hiding(f) for f in sys.meta_path]
before = set(sys.modules)

for package in ("alignax", "experiments"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if not info.name.endswith(".__main__"):  # entry points run their command on import
            importlib.import_module(info.name)

import alignax.data

tokenizer = alignax.data.default_tokenizer()
conversation = {"prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}
dataset = alignax.data.prepare_dataset([conversation] * 2, tokenizer, max_length=32)
batch = next(dataset.batches(batch_size=2, seed=0))
assert batch["chosen_input_ids"].shape == (2, 32)

imported = {m.partition(".")[0] for m in set(sys.modules) - before}
third_party = {m for m in imported if dists(m) - {own}}
print(json.dumps({"imported": sorted(third_party), "hidden": sorted(hidden),
                  "undeclared": sorted(m for m in third_party if not dists(m) & declared)}))
'''


def test_a_plain_install_imports_only_declared_dependencies():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "pyproject.toml")], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["undeclared"] == []
    # the emulation hides what only the test extra brings, and the chat path needs jinja2
    assert {"torch", "pytest", "hypothesis"} <= set(report["hidden"])
    assert {"jinja2", "transformers", "datasets", "grain"} <= set(report["imported"])
