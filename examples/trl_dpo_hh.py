# trl_dpo_hh.py: the same run with TRL's DPOTrainer (pip install -e ".[bench]")
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model = AutoModelForCausalLM.from_pretrained("EleutherAI/pythia-160m")
tokenizer = AutoTokenizer.from_pretrained("EleutherAI/pythia-160m")
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
dataset = load_dataset("json", data_files="hh.jsonl", split="train")
args = DPOConfig(output_dir="runs/trl_dpo_hh", beta=0.1, max_length=128, max_steps=16,
                 per_device_train_batch_size=8, learning_rate=1e-4,
                 lr_scheduler_type="constant", bf16=False, logging_steps=1, report_to="none")
trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()  # resuming needs train(resume_from_checkpoint=True) on the rerun
trainer.save_model()
