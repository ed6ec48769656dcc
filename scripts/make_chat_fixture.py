"""Makes the chat-template parity fixture with Hugging Face transformers (run once, in a venv
outside the repo: `pip install transformers tokenizers`):

    python scripts/make_chat_fixture.py trainer/tests/fixtures/chat

For two template families (Llama 3's header/eot template and ChatML) it writes a tokenizer
directory (`tokenizer.json` with the family's special tokens added to the small BPE tokenizer
of `trainer/tests/fixtures/tokenizer`, and `tokenizer_config.json` with its `chat_template`)
and `expected.json`: per conversation, the token ids `apply_chat_template(tokenize=True)` gives
and the loss mask (1 on each assistant turn's tokens). The mask is what transformers renders
for an assistant turn: the tokens of `messages[:i+1]` past those of `messages[:i]` with
`add_generation_prompt=True` (the approach of TRL's completion-only training).
"""
import json, os, shutil, sys

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

out = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures/chat"
here = os.path.dirname(os.path.abspath(__file__))
bpe = os.path.join(here, "..", "trainer", "tests", "fixtures", "tokenizer", "tokenizer.json")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
families = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
}
conversations = [
    [{"role": "user", "content": "what is two plus two?"},
     {"role": "assistant", "content": "four"}],
    [{"role": "system", "content": "answer briefly"},
     {"role": "user", "content": "the lazy fox?"},
     {"role": "assistant", "content": "jumps over the dog"},
     {"role": "user", "content": "and the quick brown one?"},
     {"role": "assistant", "content": "  it trains llamas in rust  "}],
    [{"role": "user", "content": "Grüße, llamas! 🦙"},
     {"role": "assistant", "content": "answer: four\nquestion: what"}],
]
for name, (template, specials, bos, eos) in families.items():
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    tok = Tokenizer.from_file(bpe)
    tok.add_special_tokens(specials)
    tok.save(os.path.join(d, "tokenizer.json"))
    config = {"chat_template": template, "eos_token": eos, "bos_token": bos,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"),
                                 bos_token=bos, eos_token=eos)
    hf.chat_template = template
    expected = []
    for conv in conversations:
        ids = list(hf.apply_chat_template(conv, tokenize=True, return_dict=False))
        mask = [0] * len(ids)
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            before = hf.apply_chat_template(conv[:i], tokenize=True, add_generation_prompt=True,
                                            return_dict=False) if i else []
            upto = hf.apply_chat_template(conv[:i + 1], tokenize=True, return_dict=False)
            assert list(upto[:len(before)]) == list(before), "not a prefix"
            for j in range(len(before), len(upto)):
                mask[j] = 1
        expected.append({"messages": conv, "input_ids": ids, "loss_mask": mask})
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    print(name, [len(e["input_ids"]) for e in expected])
