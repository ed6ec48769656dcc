"""Loads a lockstep export with Hugging Face transformers and generates from a prompt.

Run it in a Python virtual environment outside the repo (not in CI):

    python3 -m venv ~/venv-hf && ~/venv-hf/bin/pip install torch transformers safetensors
    ~/venv-hf/bin/python scripts/serve_check.py runs/quickstart/export/quickstart ["PROMPT"]

PATH is a lineage (its latest.json names the promoted version) or a version directory. Every
file is first checked against the sha256 in lockstep.json. The quickstart model is byte-level
(ids are UTF-8 bytes, 0 ends a document); a model exported with a tokenizer uses it.
"""
import hashlib
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/export/quickstart"
prompts = sys.argv[2:] or ["Q: What color is snow?\nA: ", "Q: What is 12 plus 30?\nA: ",
                           "Q: Spell 'river' backwards.\nA: "]

if os.path.exists(os.path.join(path, "latest.json")):
    with open(os.path.join(path, "latest.json")) as f:
        latest = json.load(f)
    path = os.path.join(path, latest["version"])
with open(os.path.join(path, "lockstep.json")) as f:
    record = json.load(f)
for entry in record["files"]:
    with open(os.path.join(path, entry["name"]), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != entry["sha256"]:
        sys.exit(f"{entry['name']}: sha256 {digest} does not match lockstep.json")

model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
model.eval()
print(f"loaded {record['name']}/{record['version']} (step {record['step']}, train loss "
      f"{record['train_loss']:.4f}, eval loss {record['eval_loss']}) as "
      f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"torch {torch.__version__}")

byte_level = not os.path.exists(os.path.join(path, "tokenizer.json"))
tok = None if byte_level else AutoTokenizer.from_pretrained(path)
for prompt in prompts:
    if byte_level:
        ids = torch.tensor([list(prompt.encode())])
        eos = 0
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
        eos = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    new = out[0, ids.shape[1]:].tolist()
    if byte_level:
        text = bytes(t for t in new if t != 0).decode(errors="replace")
    else:
        text = tok.decode(new, skip_special_tokens=True)
    print(f"{prompt!r} -> {text!r}")
