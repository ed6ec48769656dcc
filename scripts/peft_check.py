"""Checks a LoRA job's exports with Hugging Face PEFT (run by hand in a venv outside the repo:
`pip install torch transformers peft safetensors`; not in CI):

    python scripts/peft_check.py BASE_DIR ADAPTER_DIR MERGED_DIR

BASE_DIR is the job's `model.base` (a Hugging Face directory), ADAPTER_DIR its export with
`--lora adapter` and MERGED_DIR with `--lora merge` (the default) of the same checkpoint. It
loads the adapter with `peft.PeftModel.from_pretrained(base, ADAPTER_DIR)` and the merged model
with transformers, and checks that both give the same logits (within 1e-4) for fixed token ids,
and that they differ from the base's (the adapters are trained). Exits non-zero otherwise.
"""
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
vocab = base.config.vocab_size
ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(5))
with torch.no_grad():
    plain = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits
    merged = LlamaForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()(
        input_ids=ids).logits
worst = (adapted - merged).abs().max().item()
moved = (adapted - plain).abs().max().item()
print(f"PEFT adapter vs lockstep's merged export: worst logit difference {worst:.3e}")
print(f"adapter vs base: largest logit change {moved:.3e}")
if worst > 1e-4 or moved < 1e-4:
    sys.exit("FAILED")
print("ok")
