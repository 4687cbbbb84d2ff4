# dpo_hh.py: DPO on an Anthropic-HH JSONL file; run it with `alignax train dpo_hh.py`
from alignax.objectives import DPO
from alignax.trainer import DataConfig, ModelConfig, RunConfig, TrainConfig

config = RunConfig(
    run_dir="runs/dpo_hh",  # rerun to resume; the model + tokenizer land in runs/dpo_hh/export
    model=ModelConfig("EleutherAI/pythia-160m", pad_token="<|endoftext|>"),  # or a local dir
    data=DataConfig("hh.jsonl", max_length=128),
    objective=DPO(beta=0.1),
    train=TrainConfig(steps=16, batch_size=8, learning_rate=1e-4),
)
