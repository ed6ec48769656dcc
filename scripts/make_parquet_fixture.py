"""Makes the Parquet fixtures with pyarrow (run once, in a venv outside the repo:
`pip install pyarrow`):

    python scripts/make_parquet_fixture.py trainer/tests/fixtures/parquet

- `quickstart.parquet`: configs/data/quickstart.jsonl's 4000 records with other column names
  (`body` for text, `question`/`answer` for prompt/completion), in row groups of 500, zstd;
- `chat.parquet`: configs/data/chat.jsonl's first 500 conversations, the messages in a column
  `conversation` (a list of {role, content} structs), snappy.
Training on them with `[data.columns]` mapping the names back must read what training on the
JSONL reads.
"""
import json, os, sys

import pyarrow as pa
import pyarrow.parquet as pq

out = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures/parquet"
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
os.makedirs(out, exist_ok=True)
rows = [json.loads(l) for l in open(os.path.join(root, "configs/data/quickstart.jsonl"))]
table = pa.table({
    "id": list(range(len(rows))),
    "body": [r.get("text") for r in rows],
    "question": [r.get("prompt") for r in rows],
    "answer": [r.get("completion") for r in rows],
})
pq.write_table(table, os.path.join(out, "quickstart.parquet"), row_group_size=500,
               compression="zstd")
chats = [json.loads(l) for l in open(os.path.join(root, "configs/data/chat.jsonl"))][:500]
msg = pa.struct([("role", pa.string()), ("content", pa.string())])
table = pa.table({"conversation": pa.array([c["messages"] for c in chats],
                                           type=pa.list_(msg))})
pq.write_table(table, os.path.join(out, "chat.parquet"), row_group_size=100,
               compression="snappy")
with open(os.path.join(out, "chat.jsonl"), "w") as f:
    for c in chats:
        f.write(json.dumps(c) + "\n")
print("wrote", out)
