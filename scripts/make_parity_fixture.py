"""Makes the trainer's parity fixtures with Hugging Face transformers (run once, in a venv outside
the repo: `pip install torch transformers tokenizers safetensors`):

    python scripts/make_parity_fixture.py trainer/tests/fixtures

For two tiny random Llamas (f32 untied; bf16 with tied embeddings and no GQA) it writes the HF
directory (config.json + model.safetensors) and `reference.safetensors` with a fixed input's
token ids, HF's logits for it, and the loss of each of 5 AdamW steps (lr 1e-3, weight decay 0.01,
global-norm clipping at 1.0) on that input (labels = input ids; HF shifts them). It also trains a
small byte-level BPE `tokenizer.json` and records how it encodes a few strings.
"""
import json, os, sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures"
torch.manual_seed(0)


def make(name, dtype, seed=None, hidden=64, vocab=256, tokenizer=None, **kw):
    if seed is not None:  # its own seed: the same weights whether or not the others are made
        torch.manual_seed(seed)
    if "rope_parameters" not in kw:
        kw.setdefault("rope_theta", 10000.0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=160,
                      num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5, **kw)
    model = LlamaForCausalLM(cfg).to(dtype)
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(d):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))
    # The reference is computed in f32 from the stored weights.
    model = model.float().train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.reshape(-1, vocab).contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    save_file({"input_ids": ids.to(torch.int32).contiguous(), "logits": logits,
               "losses": torch.tensor(losses, dtype=torch.float64)},
              os.path.join(d, "reference.safetensors"))
    if tokenizer:
        import shutil
        shutil.copy(tokenizer, os.path.join(d, "tokenizer.json"))
    print(name, "losses", losses)


only = os.environ.get("ONLY")
if not only:
    make("tiny-llama", torch.float32, num_attention_heads=4, num_key_value_heads=2,
         tie_word_embeddings=False)
    make("tiny-llama-bf16-tied", torch.bfloat16, num_attention_heads=4, num_key_value_heads=4,
         tie_word_embeddings=True)

# A small byte-level BPE tokenizer and how HF encodes a few strings with it.
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
corpus = ["the quick brown fox jumps over the lazy dog", "lockstep trains llamas in rust",
          "question: what is two plus two? answer: four"] * 20
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
d = os.path.join(out, "tokenizer")
os.makedirs(d, exist_ok=True)
tok.save(os.path.join(d, "tokenizer.json"))
samples = ["the lazy fox", "Grüße, llamas! 🦙", "answer: four"]
if not only:
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump([{"text": s, "ids": tok.encode(s).ids} for s in samples], f, indent=1)

# A Llama 3-style model: GQA, tied embeddings, llama3 RoPE scaling (head size 32, so its
# frequencies fall in all three bands: kept, smoothed and divided by the factor), and the BPE
# tokenizer above (vocabulary 320 ≥ its 300 ids).
make("tiny-llama3", torch.float32, seed=3, hidden=128, vocab=320,
     tokenizer=os.path.join(d, "tokenizer.json"), num_attention_heads=4,
     num_key_value_heads=2, tie_word_embeddings=True,
     rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                      "original_max_position_embeddings": 16})
# Linear RoPE scaling.
make("tiny-llama-linear", torch.float32, seed=4, num_attention_heads=4, num_key_value_heads=2,
     tie_word_embeddings=False,
     rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
