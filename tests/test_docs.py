"""Every fenced code block of README.md and BUILD.md, run or checked against the real thing.

One test per block, its id `FILE:LINE` (the line of the opening fence). Blocks are found by
scanning the files, so a block added later is covered without touching this file; a block
whose language is not `python` or `bash`, or a bash command line no rule below recognises,
fails, naming the block and the line.

python blocks run in this process (one shared JIT cache), each in a fresh namespace, in a
fresh temporary working directory. The block is compiled with its own file name and line
numbers, so a traceback points at the README/BUILD line. The working directory holds the
file the docs tell the user to bring, `hh.jsonl` (64 Anthropic-HH records, the format of
`Anthropic/hh-rlhf`). Hub ids cannot be downloaded here: each string literal of the block that
is a hub id of the table below is replaced by a local directory, built once per session the
first time a block names it (`HF_HUB_OFFLINE=1`, so any other hub id fails at once, naming itself):

| hub id | replaced by |
|---|---|
| "EleutherAI/pythia-160m" | tiny `GPTNeoXForCausalLM` (hidden 64, 2 layers, vocab of the embedded tokenizer) written by transformers' `save_pretrained` (safetensors), with `alignax.data.default_tokenizer()` saved next to it |
| "gpt2" | tiny `GPT2LMHeadModel` (hidden 64, 2 layers), the same way |
| "Anthropic/hh-rlhf" | a directory in the hub repo's layout: `{harmless,helpful}-base/{train,test}.jsonl.gz` of `chosen` / `rejected` transcripts |
| "stanfordnlp/imdb" | a directory in the hub repo's layout: `plain_text/{train,test}-00000-of-00001.parquet` with `text` / `label` columns |

bash blocks are parsed, never run as long jobs: each logical line (continuations joined,
comments dropped) is split at `&&`, leading `VAR=value` assignments are dropped, `cd DIR` moves
the block's working directory (from the repository root), and each command must match a rule:
- `python3.X -m venv DIR`: pyproject's `requires-python` admits 3.X;
- `pip install [-U] -e "PATH[X,Y]" REQ...`: PATH is the repository, each extra X exists in
  pyproject.toml; every other requirement names a declared dependency and, with extras,
  extras its installed distribution provides (`jax[cuda12]`);
- `python -m pytest ARGS`: every path argument exists (`::` node ids allowed);
- `python -m experiments.X ARGS`: the module (or a package with a `__main__`) exists and ARGS
  parse with `alignax.trainer.cli.parse_config(X.Config, ARGS)` (validated, nothing runs);
- `alignax CMD ARGS`: `alignax.trainer.cli.parse` accepts them (config file validated, nothing
  runs), in a temporary directory holding `hh.jsonl` and every python block of the same file
  whose first line is a `# NAME.py: ...` comment, written as NAME.py (hub ids replaced);
- `python benchmarks/X.py ARGS`: ARGS parse with that benchmark's `parse_args(argv)`;
- `python notebooks/X.py`: the file exists (tests/test_notebooks.py runs the notebooks).
`python` is any of python, python3, python3.X or a path ending in one (`.venv/bin/python`).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib
import importlib.metadata
import importlib.util
import io
import json
import pathlib
import re
import shlex
import sys
import textwrap
import tokenize
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BUILD.md")
LANGUAGES = ("python", "bash")


@dataclasses.dataclass(frozen=True)
class Block:
    file: str
    line: int  # 1-based line of the opening fence
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


def doc_blocks(file: str, text: str | None = None) -> list[Block]:
    """Every fenced block of `file` (or of `text`; indented ones too, e.g. in list items)."""
    lines = ((ROOT / file).read_text() if text is None else text).splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = re.match(r"^(\s*)```(\S*)", lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{file}:{index + 1}: code fence never closed")
        text = textwrap.dedent("\n".join(lines[index + 1:end])) + "\n"
        blocks.append(Block(file, index + 1, opening.group(2), text))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for file in DOCS for block in doc_blocks(file)]


# ---------------------------------------------------------------- hub ids -> local directories

def _tiny_causal_lm(directory: pathlib.Path, family: str) -> None:
    import torch
    import transformers

    from alignax.data import default_tokenizer

    tokenizer = default_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=256, **ids)
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(directory)  # safetensors
    tokenizer.save_pretrained(str(directory))


def hh_records(count: int) -> list[dict]:
    """Anthropic-HH transcripts: the prompt is everything up to the last "Assistant:"."""
    topics = ("fix my bike", "bake bread", "learn French", "sleep better", "save money",
              "plant tomatoes", "write a letter", "clean a keyboard")
    good = (" Start with the basics and go step by step.", " Happy to help: here is how.")
    bad = (" No.", " Ask someone else.")
    records = []
    for i in range(count):
        prompt = f"\n\nHuman: How do I {topics[i % len(topics)]}? ({i})\n\nAssistant:"
        records.append({"chosen": prompt + good[i % 2], "rejected": prompt + bad[i % 2]})
    return records


def _hh_dataset(directory: pathlib.Path) -> None:
    for subset in ("harmless-base", "helpful-base"):
        (directory / subset).mkdir(parents=True)
        for split, count in (("train", 16), ("test", 4)):
            with gzip.open(directory / subset / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in hh_records(count))


def _imdb_dataset(directory: pathlib.Path) -> None:
    import datasets

    (directory / "plain_text").mkdir(parents=True)
    reviews = ["A wonderful film with a moving story.", "Dull and far too long.",
               "The acting is superb.", "I wanted my two hours back."]
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"text": reviews, "label": [1, 0, 1, 0]}).to_parquet(
            str(directory / "plain_text" / f"{split}-00000-of-00001.parquet"))


HUB_IDS = {
    "EleutherAI/pythia-160m": lambda d: _tiny_causal_lm(d, "gpt_neox"),
    "gpt2": lambda d: _tiny_causal_lm(d, "gpt2"),
    "Anthropic/hh-rlhf": _hh_dataset,
    "stanfordnlp/imdb": _imdb_dataset,
}
"""Hub id -> the builder of its local stand-in (the table of the module docstring)."""


@pytest.fixture(scope="session")
def hub_dirs(tmp_path_factory):
    """hub id -> its local directory, built the first time a block asks for it."""
    built: dict[str, pathlib.Path] = {}
    root = tmp_path_factory.mktemp("hub")

    def get(hub_id: str) -> pathlib.Path:
        if hub_id not in built:
            directory = root / hub_id.replace("/", "--")
            directory.mkdir()
            HUB_IDS[hub_id](directory)
            built[hub_id] = directory
        return built[hub_id]

    return get


def substitute_hub_ids(text: str, hub_dirs) -> str:
    """`text` (Python) with every string literal that is a hub id of HUB_IDS replaced by the
    literal of its local directory (comments and other strings untouched)."""
    lines = text.splitlines(keepends=True)
    spans = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING and token.string[:1] in "\"'":
            value = ast.literal_eval(token.string)
            if value in HUB_IDS:
                spans.append((token.start, token.end, repr(str(hub_dirs(value)))))
    for (row, col), (_, end_col), literal in reversed(spans):  # single-line literals
        line = lines[row - 1]
        lines[row - 1] = line[:col] + literal + line[end_col:]
    return "".join(lines)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding the user's `hh.jsonl`; hub access off (the libraries
    read the variables at import, hence their constants too), so an unknown hub id fails at
    once instead of after minutes of retries."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh_records(64)))
    return tmp_path


def named_file(block: Block) -> str | None:
    """"dpo_hh.py" for a python block opening with `# dpo_hh.py: ...`, else None."""
    match = re.match(r"#\s*([\w.-]+\.py):", block.text)
    return match.group(1) if block.language == "python" and match else None


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.name)
def test_doc_block(block, workdir, hub_dirs):
    if block.language not in LANGUAGES:
        pytest.fail(f"{block.name}: a ```{block.language} block the docs test cannot classify; "
                    f"mark it ```python (executed) or ```bash (checked), see tests/test_docs.py")
    if block.language == "python":
        run_python(block, hub_dirs)
    else:
        check_bash(block, workdir, hub_dirs)


def run_python(block: Block, hub_dirs) -> None:
    source = "\n" * block.line + substitute_hub_ids(block.text, hub_dirs)  # README line numbers
    exec(compile(source, str(ROOT / block.file), "exec"), {"__name__": "__main__"})


# --------------------------------------------------------------------------- bash blocks

PYTHON = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")
PIP = re.compile(r"^(.*/)?pip3?$")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(offset of the first physical line, the line with continuations joined), no blanks."""
    result, pending, start = [], "", 0
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        if pending.strip():
            result.append((start, pending))
        pending = ""
    return result


def commands(line: str) -> list[list[str]]:
    """`a && b` -> [[a's words], [b's words]], comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    result = [[]]
    for token in lexer:
        if token == "&&":
            result.append([])
        elif token and set(token) <= set("&;|"):
            raise ValueError(f"only `&&` chains are checked, found {token!r}")
        else:
            result[-1].append(token)
    return [words for words in result if words]


def check_bash(block: Block, workdir: pathlib.Path, hub_dirs) -> None:
    for name in {named_file(b) for b in ALL_BLOCKS if b.file == block.file} - {None}:
        text = next(b.text for b in ALL_BLOCKS if b.file == block.file and named_file(b) == name)
        (workdir / name).write_text(substitute_hub_ids(text, hub_dirs))
    cwd = ROOT
    for offset, line in logical_lines(block.text):
        for words in commands(line):
            where = f"{block.file}:{block.line + 1 + offset}: `{' '.join(words)}`"
            try:
                cwd = check_command(words, cwd)
            except (AssertionError, ValueError, TypeError, SystemExit, OSError) as error:
                pytest.fail(f"{where}: {type(error).__name__}: {error}")


def check_command(words: list[str], cwd: pathlib.Path) -> pathlib.Path:
    """Checks one command; returns the working directory for the next one."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # VAR=value
    program, args = words[0], words[1:]
    if program == "cd":
        target = (cwd / args[0]).resolve()
        assert target.is_dir(), f"no directory {target}"
        return target
    if PIP.match(program):
        check_pip(args, cwd)
    elif PYTHON.match(program) and args[:2] == ["-m", "pip"]:
        check_pip(args[2:], cwd)
    elif PYTHON.match(program) and args[:2] == ["-m", "venv"]:
        version = re.search(r"python(\d+\.\d+)$", program)  # python3.11: must be supported
        if version:
            assert version.group(1) in SpecifierSet(pyproject()["project"]["requires-python"]), \
                f"pyproject.toml's requires-python excludes Python {version.group(1)}"
    elif PYTHON.match(program) and args[:1] == ["-m"] and len(args) > 1:
        check_module(args[1], args[2:], cwd)
    elif PYTHON.match(program) and args and args[0].endswith(".py"):
        check_script(cwd / args[0], args[1:])
    elif program == "alignax":
        from alignax.trainer import cli

        cli.parse(args)
    else:
        raise ValueError("no rule of tests/test_docs.py recognises this command")
    return cwd


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def check_pip(args: list[str], cwd: pathlib.Path) -> None:
    assert args[:1] == ["install"], "only `pip install` is recognised"
    project = pyproject()["project"]
    declared = {Requirement(r).name.lower() for r in project["dependencies"]}
    words = [a for a in args[1:] if a not in ("-U", "--upgrade")]
    editable = False
    while words:
        word = words.pop(0)
        if word == "-e":
            editable = True
            path, _, extras = words.pop(0).partition("[")
            assert (cwd / path).resolve() == ROOT, f"-e {path} is not the repository"
            for extra in filter(None, extras.rstrip("]").split(",")):
                assert extra in project["optional-dependencies"], \
                    f"pyproject.toml has no extra {extra!r}"
        else:
            requirement = Requirement(word)
            assert requirement.name.lower() in declared, \
                f"{requirement.name} is not a declared dependency in pyproject.toml"
            provided = importlib.metadata.metadata(requirement.name).get_all("Provides-Extra")
            missing = requirement.extras - set(provided or ())
            assert not missing, f"{requirement.name} provides no extras {sorted(missing)}"
    assert editable, "the docs install the repository with `pip install -e`"


def check_module(module: str, args: list[str], cwd: pathlib.Path) -> None:
    if module == "pytest":
        for arg in args:
            if "/" in arg or arg.endswith(".py"):
                path = cwd / arg.split("::")[0]
                assert path.exists(), f"pytest path {arg} does not exist"
    elif module.startswith("experiments."):
        from alignax.trainer.cli import parse_config

        spec = importlib.util.find_spec(module)
        assert spec is not None, f"no module {module}"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__"), f"{module} has no __main__"
        config_class = importlib.import_module(module).Config
        parse_config(config_class, args, prog=f"python -m {module}")
    else:
        raise ValueError(f"no rule of tests/test_docs.py recognises `python -m {module}`")


def check_script(path: pathlib.Path, args: list[str]) -> None:
    path = path.resolve()
    assert path.is_file(), f"no script {path}"
    folder = path.parent.relative_to(ROOT).as_posix()
    if folder == "notebooks":
        return  # executed by tests/test_notebooks.py
    if folder != "benchmarks":
        raise ValueError(f"no rule of tests/test_docs.py recognises scripts in {folder}/")
    spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert hasattr(module, "parse_args"), f"{path.name} has no parse_args(argv)"
    module.parse_args(args)


# ------------------------------------------------------------- the harness can fail

def test_harness_finds_every_fence_and_refuses_what_it_cannot_check(tmp_path, monkeypatch):
    text = "x\n```python\nprint(1)\n```\n- item\n\n  ```text\n  out\n  ```\n```\nbare\n```\n"
    assert [(b.line, b.language, b.text) for b in doc_blocks("X.md", text)] == [
        (2, "python", "print(1)\n"), (7, "text", "out\n"), (10, "", "bare\n")]
    with pytest.raises(ValueError, match="never closed"):
        doc_blocks("X.md", "```bash\nls\n")
    monkeypatch.chdir(tmp_path)
    refused = [(["make", "all"], ValueError), (["python", "-m", "flake8"], ValueError),
               (["python", "tools/x.py"], AssertionError),
               (["pip", "install", "-e", ".[no_such_extra]"], AssertionError),
               (["pip", "install", "-e", ".", "left-pad"], AssertionError),
               (["pip", "install", "-e", ".", "jax[no_such_extra]"], AssertionError),
               (["python3.9", "-m", "venv", ".venv"], AssertionError),
               (["python", "-m", "pytest", "tests/test_no_such_file.py"], AssertionError),
               (["python", "-m", "experiments.fdpo_sentiment", "--no_such_flag", "1"],
                SystemExit),
               (["python", "benchmarks/ppo.py", "--no-such-flag"], SystemExit),
               (["alignax", "train", "no_such_config.py"], (ValueError, OSError))]
    for words, error in refused:
        with pytest.raises(error):
            check_command(words, ROOT)
    assert commands("A=1 python x.py --a '' && cd b  # note") == [
        ["A=1", "python", "x.py", "--a", ""], ["cd", "b"]]
    assert logical_lines("a \\\n  b\n\nc\n") == [(0, "a    b"), (3, "c")]


def test_hub_ids_are_replaced_in_string_literals_only():
    text = 'f("gpt2", x="gpt2x")  # or "gpt2"\n'
    assert substitute_hub_ids(text, lambda hub_id: pathlib.Path("/local") / hub_id) == \
        "f('/local/gpt2', x=\"gpt2x\")  # or \"gpt2\"\n"


def test_an_unknown_hub_id_fails_at_once_naming_itself(workdir, hub_dirs):
    block = Block("X.md", 1, "python",
                  'import alignax.models\nalignax.models.from_pretrained("someone/model-x")\n')
    with pytest.raises(OSError, match="someone/model-x"):
        run_python(block, hub_dirs)
