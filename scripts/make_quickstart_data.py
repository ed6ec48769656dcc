"""Writes configs/data/quickstart.jsonl: a small synthetic instruction set whose loss visibly
falls within a few hundred steps of a byte-level model, and configs/data/quickstart-eval.jsonl:
200 held-out records drawn after them from the same generator. Deterministic (seeded);
standard library only. Usage: python3 scripts/make_quickstart_data.py [OUT [EVAL_OUT]]"""
import json, random, sys

out = sys.argv[1] if len(sys.argv) > 1 else "configs/data/quickstart.jsonl"
eval_out = sys.argv[2] if len(sys.argv) > 2 else "configs/data/quickstart-eval.jsonl"
rng = random.Random(1234)
words = ("lock step rust llama gang shard ring model token batch epoch loss graph tensor cloud "
         "river stone maple ocean tiger amber cedar delta ember frost grove harbor ivory").split()
colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
          "blood": "red", "plum": "purple", "carrot": "orange"}
records = []
for _ in range(4000 + 200):
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        records.append({"prompt": f"Q: What is {a} plus {b}?\nA: ", "completion": f"{a + b}."})
    elif kind == 1:
        w = rng.choice(words)
        records.append({"prompt": f"Q: Spell '{w}' backwards.\nA: ", "completion": f"{w[::-1]}."})
    elif kind == 2:
        w = " ".join(rng.sample(words, 3))
        records.append({"prompt": f"Q: Shout '{w}'.\nA: ", "completion": f"{w.upper()}!"})
    elif kind == 3:
        t = rng.choice(list(things))
        records.append({"prompt": f"Q: What color is {t}?\nA: ", "completion": f"{things[t]}."})
    elif kind == 4:
        n = rng.randrange(2, 6)
        w = rng.choice(words)
        records.append({"prompt": f"Q: Repeat '{w}' {n} times.\nA: ",
                        "completion": " ".join([w] * n) + "."})
    else:
        c = rng.choice(colors)
        w = rng.choice(words)
        records.append({"text": f"The {c} {w} is next to the {rng.choice(colors)} "
                                f"{rng.choice(words)}."})
for path, part in ((out, records[:4000]), (eval_out, records[4000:])):
    with open(path, "w") as f:
        for r in part:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(part)} records to {path}")
