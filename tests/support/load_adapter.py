"""Run in a fresh process: load a downloaded adapter the way a user would, compare its
weights with what the worker saved, and generate a few tokens."""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, adapter_dir, saved_path = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(base_dir)
model = PeftModel.from_pretrained(base, adapter_dir)
tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
saved = load_file(saved_path)
assert len(saved) == len(loaded) > 0, (len(saved), len(loaded))
for name, tensor in saved.items():
    match = [v for k, v in loaded.items() if k.replace(".default", "").endswith(name.removeprefix("base_model.model."))]
    assert len(match) == 1 and torch.equal(match[0], tensor), name
print("weights equal")

prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt")
ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
out = model.generate(ids, max_new_tokens=5, do_sample=False)
print("generated", out.shape[1] - ids.shape[1], "tokens")
