#!/usr/bin/env python3
"""Write a random-weight Llama of 7B, 13B or 33B parameters, shard by shard (issue 27).

  assets/smollm2-f32/ (tokenizer)  ->  OUT/
      config.json, generation_config.json, model-0000i-of-0000n.safetensors (bf16, ~2 GB
      each), model.safetensors.index.json, tokenizer files

Shapes are Llama-2's (7b: hidden 4096, MLP 11008, 32 layers, 32 heads; 13b: 5120, 13824, 40,
40) and LLaMA-1's 33B (30b: 6656, 17920, 60, 52), untied, with SmolLM2's tokenizer
(vocabulary 49152, so the embedding and head are 1.5x Llama-2's): 7b has 6.88e9 parameters
(13.8 GB in bf16), 13b 13.3e9 (26.5 GB), 30b 32.7e9 (65 GB). Each tensor is drawn from a
seeded normal (std 0.02, norms 1) and written as soon as its shard is full, so the whole
model is never in memory: peak RSS is about one shard. Nothing is trained; only speed and
memory are measured on it.

With --nf4 the blocks' linear weights are written straight to NF4 with double quantization
(blocksize 64), quantized by bitsandbytes on the CPU and serialized as transformers saves a
`load_in_4bit` model (`<w>`, `<w>.absmax`, `<w>.quant_map`, `<w>.nested_absmax`,
`<w>.nested_quant_map`, `<w>.quant_state.bitsandbytes__nf4`); the embedding, head and norms
stay bf16, as transformers keeps them. That is how a model larger than this machine's disk
in bf16 is made: 30b is 18 GB in NF4. Without --nf4, quantize with `ferrule quantize`.

Run with the reference venv:
  $(scripts/reference-venv.sh) bench/make_llama_large.py --size 7b --out /tmp/llama-7b
  $(scripts/reference-venv.sh) bench/make_llama_large.py --size 30b --nf4 --out /tmp/llama-30b-nf4
"""
import argparse
import json
import os
import shutil
import sys

SIZES = {
    # hidden, intermediate, layers, heads, kv heads
    "7b": (4096, 11008, 32, 32, 32),
    "13b": (5120, 13824, 40, 40, 40),
    "30b": (6656, 17920, 60, 52, 52),
}
SHARD_BYTES = 2 << 30


def tensors(size, vocab):
    """(name, shape) of every tensor, in the order transformers saves them."""
    h, i, layers, heads, kv = SIZES[size]
    d = h // heads
    yield "model.embed_tokens.weight", (vocab, h)
    for l in range(layers):
        p = f"model.layers.{l}."
        yield p + "self_attn.q_proj.weight", (heads * d, h)
        yield p + "self_attn.k_proj.weight", (kv * d, h)
        yield p + "self_attn.v_proj.weight", (kv * d, h)
        yield p + "self_attn.o_proj.weight", (h, heads * d)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (vocab, h)


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=os.path.join(root, "assets/smollm2-f32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nf4", action="store_true", help="the blocks' linear weights in NF4 (bitsandbytes)")
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    h, i, layers, heads, kv = SIZES[args.size]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    if args.nf4:
        import bitsandbytes.functional as bnbf

        config.quantization_config = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        }
    tmp = args.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(args.seed)
    shards, shard, shard_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"shard-{len(shards)}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        shards.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, shape in tensors(args.size, len(tok)):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        total += t.numel()
        if args.nf4 and ".layers." in name and t.dim() == 2:
            q, state = bnbf.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
            parts = {name: q, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}
        else:
            parts = {name: t}
        for k, v in parts.items():
            shard[k] = v
            shard_bytes += v.numel() * v.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    n = len(shards)
    weight_map = {}
    for k, (old, names) in enumerate(shards):
        new = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        weight_map.update({t: new for t in names})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    what = "NF4 blocks, bf16 tables" if args.nf4 else "bf16"
    print(f"wrote {args.out}: {total:,} parameters ({what}, {n} shards)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
