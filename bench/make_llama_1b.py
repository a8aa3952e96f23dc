#!/usr/bin/env python3
"""Write a random-weight 1.07B-parameter Llama for the bf16 benchmarks (issue 24).

  assets/smollm2-f32/ (tokenizer)  ->  assets/llama-1b-random/
      config.json, generation_config.json, model.safetensors (f32, 4.3 GB), tokenizer files

TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads) with
SmolLM2's tokenizer (vocabulary 49152) and tied embeddings: 1,069,639,680 parameters.
transformers' own initialisation (normal, std 0.02), seeded; nothing is trained, so only
speed and memory are measured on it. Needs assets/smollm2-f32 (bench/prepare_smollm2_f32.py).

Idempotent (--force rewrites). Run with the reference venv:
  $(scripts/reference-venv.sh) bench/make_llama_1b.py
"""
import argparse
import os
import shutil
import sys


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=os.path.join(root, "assets/smollm2-f32"))
    p.add_argument("--out", default=os.path.join(root, "assets/llama-1b-random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype on disk (bfloat16: 2.1 GB, for benchmarks short of disk)")
    args = p.parse_args()
    if not args.force and all(os.path.exists(os.path.join(args.out, f)) for f in ("config.json", "model.safetensors")):
        print(f"{args.out} exists; nothing to do (--force to rewrite)", file=sys.stderr)
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    tmp = args.out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
    tok.save_pretrained(tmp)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n:,} parameters ({args.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
