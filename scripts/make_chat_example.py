"""Makes the LoRA-on-chat example (`configs/lora-chat.toml`):

- `configs/models/llama3-chat-tiny/`: a small Llama 3-style base made by transformers (GQA,
  tied embeddings, llama3 RoPE scaling; random weights, seeded) with a byte-level BPE tokenizer
  trained on the chat corpus plus Llama 3's special tokens, and Llama 3's chat template in its
  `tokenizer_config.json`;
- `configs/data/chat.jsonl` (3000 conversations) and `configs/data/chat-eval.jsonl` (200
  held out): synthetic multi-turn chats (arithmetic, spelling, colours) from a seeded
  generator.

Run once in a venv outside the repo (`pip install torch transformers tokenizers`):
    python scripts/make_chat_example.py
"""
import json, os, random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
model_dir = os.path.join(root, "configs", "models", "llama3-chat-tiny")
data_dir = os.path.join(root, "configs", "data")
rng = random.Random(2026)
words = ("lock step rust llama gang shard ring model token batch epoch loss graph tensor cloud "
         "river stone maple ocean tiger amber cedar delta ember frost grove harbor ivory").split()
things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
          "blood": "red", "plum": "purple", "carrot": "orange"}


def turn():
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} plus {b}?", f"{a + b}."
    if kind == 1:
        w = rng.choice(words)
        return f"Spell '{w}' backwards.", f"{w[::-1]}."
    t = rng.choice(list(things))
    return f"What color is {t}?", f"{things[t]}."


def chat():
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "Answer in one short sentence."})
    for _ in range(rng.randrange(1, 4)):
        q, a = turn()
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


chats = [chat() for _ in range(3200)]
os.makedirs(data_dir, exist_ok=True)
for name, part in (("chat.jsonl", chats[:3000]), ("chat-eval.jsonl", chats[3000:])):
    with open(os.path.join(data_dir, name), "w") as f:
        for c in part:
            f.write(json.dumps(c) + "\n")

specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
corpus = [m["content"] for c in chats for m in c["messages"]] + ["system user assistant"]
tok.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
os.makedirs(model_dir, exist_ok=True)
tok.save(os.path.join(model_dir, "tokenizer.json"))
template = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": template, "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"}, f,
              indent=1)

torch.manual_seed(7)
cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=True,
                  bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                  eos_token_id=tok.token_to_id("<|eot_id|>"),
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64})
model = LlamaForCausalLM(cfg)
model.save_pretrained(model_dir, safe_serialization=True)
for f in os.listdir(model_dir):
    if f not in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(model_dir, f))
print("made", model_dir, sum(p.numel() for p in model.parameters()), "parameters")
