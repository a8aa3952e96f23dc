#!/usr/bin/env python3
"""Turns the fetched raw datasets (scripts/fetch-assets.sh) into ferrule JSONL files.

Standard library only: this is an asset step, not a runtime dependency.
Outputs (under assets/data/):
  rotten_tomatoes/{train,test}.jsonl   {"text", "label"}  label 1 = fresh, 0 = rotten
  chatterbot/{train,test}.jsonl        {"messages": [{"role","content"}, ...]}
Splits are deterministic: every 10th record goes to test.
"""
import bz2, csv, json, os, sys, glob

assets = sys.argv[1] if len(sys.argv) > 1 else "assets"
out = os.path.join(assets, "data")

def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

def split(rows):
    return [r for i, r in enumerate(rows) if i % 10 != 9], [r for i, r in enumerate(rows) if i % 10 == 9]

# Rotten Tomatoes: keep the review snippets (fresh/rotten), drop plot summaries.
rows, seen = [], set()
csv.field_size_limit(1 << 24)
with bz2.open(os.path.join(assets, "raw", "rotten_tomatoes_corpus_full.csv.bz2"), "rt") as f:
    for rec in csv.DictReader(f):
        cat, text = rec["category"], " ".join(rec["text"].split())
        if cat not in ("fresh", "rotten") or not text or text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": 1 if cat == "fresh" else 0})
train, test = split(rows)
write(os.path.join(out, "rotten_tomatoes", "train.jsonl"), train)
write(os.path.join(out, "rotten_tomatoes", "test.jsonl"), test)

# chatterbot-corpus: YAML lists of [question, answer, ...] turns. The files use a tiny,
# regular YAML subset ("- - q" / "  - a"), parsed here to avoid a YAML dependency.
def convs(path):
    cur, out_ = None, []
    for line in open(path, encoding="utf-8"):
        s = line.rstrip("\n")
        if s.startswith("- - "):
            if cur: out_.append(cur)
            cur = [s[4:]]
        elif s.startswith("  - ") and cur is not None:
            cur.append(s[4:])
        elif s.startswith("    ") and cur:
            cur[-1] += " " + s.strip()
    if cur: out_.append(cur)
    return out_

def unquote(t):
    t = t.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        t = t[1:-1]
    return t

rows = []
for path in sorted(glob.glob(os.path.join(assets, "raw", "chatterbot", "*.yml"))):
    for turns in convs(path):
        turns = [unquote(t) for t in turns if unquote(t)]
        if len(turns) < 2:
            continue
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        if msgs[-1]["role"] != "assistant":
            msgs = msgs[:-1]
        rows.append({"messages": msgs})
train, test = split(rows)
write(os.path.join(out, "chatterbot", "train.jsonl"), train)
write(os.path.join(out, "chatterbot", "test.jsonl"), test)
print(f"prepared data under {out}", file=sys.stderr)
