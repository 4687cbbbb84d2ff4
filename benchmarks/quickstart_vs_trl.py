"""The README quickstart against TRL: the README's `dpo_hh.py` config (alignax) and its
`trl_dpo_hh.py` script (TRL's DPOTrainer), read from the README's code blocks, on the same 64-record Anthropic-HH file and the same
tiny Llama checkpoint, with the same settings (beta 0.1, AdamW at a constant 1e-4, clipping at
1.0, batch 8, 16 steps, max_length 128).

    python benchmarks/quickstart_vs_trl.py [--out DIR]

Writes DIR/hh.jsonl and DIR/ckpt (the embedded tiny Llama and tokenizer, `save_pretrained`),
copies both scripts into DIR with the hub id replaced by "ckpt" (the same substitution in
both), runs `alignax train dpo_hh.py` and `python trl_dpo_hh.py` there, and prints each
script's line count and its final training losses as JSON. The data order differs (each
framework shuffles with its own generator), so the per-step losses differ; both runs start
from the same weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
HUB_ID = "EleutherAI/pythia-160m"
TOPICS = ("fix my bike", "bake bread", "learn French", "sleep better", "save money",
          "write a cover letter", "plant tomatoes", "clean a laptop keyboard")
GOOD = ("Sure, here is a helpful answer: start with the basics and go step by step.",
        "I am glad to help with that. First, gather what you need, then follow the steps.",
        "Here are the steps you asked for, with a short explanation of each one.",
        "Happy to explain it step by step, so that it is easy to follow.")
BAD = ("No.", "Go away.", "I will not answer that.", "Ask someone else.")


def hh_records(count: int) -> list[dict]:
    records = []
    for i in range(count):
        prompt = f"\n\nHuman: How do I {TOPICS[i % len(TOPICS)]}? (question {i})\n\nAssistant:"
        records.append({"chosen": f"{prompt} {GOOD[i % 4]}", "rejected": f"{prompt} {BAD[i % 4]}"})
    return records


def write_inputs(out: pathlib.Path) -> None:
    from flax import nnx

    from alignax.data import default_tokenizer
    from alignax.models import create, save_pretrained, tiny_config

    tokenizer = default_tokenizer()
    config = tiny_config("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_pretrained(create(config, rngs=nnx.Rngs(0)), out / "ckpt")
    tokenizer.save_pretrained(str(out / "ckpt"))
    (out / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh_records(64)))
    for name, text in readme_scripts().items():
        (out / name).write_text(text.replace(HUB_ID, "ckpt"))


def readme_scripts() -> dict[str, str]:
    """The README's quickstart config and its TRL counterpart: file name -> code block."""
    text = (ROOT / "README.md").read_text()
    blocks = {}
    for name, marker in (("dpo_hh.py", "## Quickstart"),
                         ("trl_dpo_hh.py", "The same run with TRL's `DPOTrainer`")):
        start = text.index("```python\n", text.index(marker)) + len("```python\n")
        blocks[name] = text[start:text.index("```", start)]
    return blocks


def run(out: pathlib.Path) -> dict:
    write_inputs(out)
    env_path = {"PYTHONPATH": str(ROOT)}
    import os

    env = {**os.environ, **env_path}
    subprocess.run([sys.executable, "-m", "alignax.trainer.cli", "train", "dpo_hh.py",
                    "--train.progress", "False"], cwd=out, env=env, check=True,
                   capture_output=True)
    alignax_losses = [json.loads(line)["loss"] for line in
                      (out / "runs" / "dpo_hh" / "metrics.jsonl").read_text().splitlines()]
    trl = subprocess.run(
        [sys.executable, "-c", "import json, runpy; g = runpy.run_path('trl_dpo_hh.py'); "
         "print(json.dumps(g['trainer'].state.log_history))"],
        cwd=out, env=env, check=True, capture_output=True, text=True)
    history = json.loads(trl.stdout.strip().splitlines()[-1])
    trl_losses = [r["loss"] for r in history if "loss" in r]
    lines = {name: len(text.splitlines()) for name, text in readme_scripts().items()}
    return {"lines": lines,
            "alignax": {"steps": len(alignax_losses), "final_loss": alignax_losses[-1],
                        "mean_loss_last_4": sum(alignax_losses[-4:]) / 4},
            "trl": {"steps": len(trl_losses), "final_loss": trl_losses[-1],
                    "mean_loss_last_4": sum(trl_losses[-4:]) / 4}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(run(pathlib.Path(out))))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args.out)))


if __name__ == "__main__":
    main()
