"""Makes the LoRA parity fixture with Hugging Face PEFT (run once, in a venv outside the repo:
`pip install torch transformers peft safetensors`):

    python scripts/make_lora_fixture.py trainer/tests/fixtures

On the Llama 3-style base `tiny-llama3` (made by scripts/make_parity_fixture.py: GQA, tied
embeddings, llama3 RoPE scaling) it applies `LoraConfig(r=4, lora_alpha=8, lora_dropout=0,
target_modules=<all seven projections>)`, sets every adapter (A and B) to non-zero values drawn
from a fixed seed, and writes `tiny-llama3/lora.safetensors` with:

- `input_ids` (2 x 16) and `logits`: the adapted model's logits for them;
- `lora/<name>`: each adapter as PEFT saves it (`base_model.model.model.layers.0.self_attn.
  q_proj.lora_A.weight`);
- `grad/<name>`: each adapter's gradient of the causal-LM loss (labels = input_ids) with the
  base frozen;
- `losses`: the loss of each of 3 steps of torch.optim.AdamW over the adapters only (lr 1e-3,
  weight decay 0.01, global-norm clipping at 1.0).
"""
import os, sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

out = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures"
d = os.path.join(out, "tiny-llama3")
base = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias="none")
model = get_peft_model(base, cfg).train()

g = torch.Generator().manual_seed(7)
adapters = {}
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            adapters[name.replace(".default", "")] = p
trainable = [p for p in model.parameters() if p.requires_grad]
assert len(trainable) == len(adapters) == 2 * 7 * base.config.num_hidden_layers

ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(input_ids=ids).logits.reshape(-1, base.config.vocab_size).contiguous()
tensors = {"input_ids": ids.to(torch.int32).contiguous(), "logits": logits}
for name, p in adapters.items():
    tensors["lora/" + name] = p.detach().clone().contiguous()

loss = model(input_ids=ids, labels=ids).loss
loss.backward()
for name, p in adapters.items():
    tensors["grad/" + name] = p.grad.detach().clone().contiguous()
model.zero_grad()

opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    losses.append(loss.item())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
save_file(tensors, os.path.join(d, "lora.safetensors"))
print("lora losses", losses)
