#!/usr/bin/env python3
"""Write a dense f32 safetensors copy of SmolLM2-135M-Instruct from its GGUF.

  assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  ->  assets/smollm2-f32/
      config.json, generation_config.json, model.safetensors, tokenizer files

transformers de-quantizes the GGUF to f32 (the same weights hf_train.py trains on
when given the .gguf). This folder is the common base of the f32 and NF4/QLoRA
runs of both tools (`ferrule merge --config` with `merge_method: passthrough` writes the
same tensors, bit for bit, from the GGUF; this script stays the reference).

Idempotent: does nothing when the output folder already has config.json and
model.safetensors (pass --force to rewrite). Run with the reference venv:
  $(scripts/reference-venv.sh) bench/prepare_smollm2_f32.py
"""
import argparse
import os
import sys


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=os.path.join(root, "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--out", default=os.path.join(root, "assets/smollm2-f32"))
    p.add_argument("--force", action="store_true")
    args = p.parse_args()

    if not args.force and all(os.path.exists(os.path.join(args.out, f)) for f in ("config.json", "model.safetensors")):
        print(f"{args.out} exists; nothing to do (--force to rewrite)", file=sys.stderr)
        return 0

    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir, gguf_file = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=gguf_file, dtype=torch.float32)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise SystemExit(f"expected only f32 parameters, got {dtypes}")

    # The weights are already dense f32; only the GGUF "quantizer" marker blocks
    # save_pretrained. Drop it so the copy loads as a plain f32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")

    tmp = args.out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)

    # Check: the copy reloads to the same weights, logits and chat rendering.
    model.eval()
    re_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    re_tok = AutoTokenizer.from_pretrained(tmp)
    sd_a, sd_b = model.state_dict(), re_model.state_dict()
    if set(sd_a) != set(sd_b) or any(not torch.equal(sd_a[k], sd_b[k]) for k in sd_a):
        raise SystemExit("reloaded weights differ from the GGUF-loaded ones")
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}]
    text_a, text_b = tok.apply_chat_template(msgs, tokenize=False), re_tok.apply_chat_template(msgs, tokenize=False)
    ids_a, ids_b = tok(text_a, add_special_tokens=False)["input_ids"], re_tok(text_b, add_special_tokens=False)["input_ids"]
    if text_a != text_b or ids_a != ids_b or tok.pad_token_id != re_tok.pad_token_id:
        raise SystemExit("reloaded tokenizer renders or tokenizes differently")
    with torch.no_grad():
        x = torch.tensor([ids_a])
        d = (model(input_ids=x).logits - re_model(input_ids=x).logits).abs().max().item()
    if d != 0.0:
        raise SystemExit(f"reloaded model's logits differ (max abs {d})")
    if os.path.exists(args.out):
        import shutil
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n:,} parameters (f32), files: {sorted(os.listdir(args.out))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
