"""The README's promises: its two opening commands, and CI running the same test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## "), "the commands come first"
    assert len(readme_commands()) == 2


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_main_command_runs_an_existing_experiment_module():
    module = re.search(r"python -m ([\w.]+)", readme_commands()[0]).group(1)
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
