"""Writes corpus/gguf/tiny-llama.gguf: a valid 1-layer llama GGUF (hidden 8, 2 heads, vocab 4,
F32 tensors) as the gguf fuzz target's seed. Run with the reference venv (scripts/reference-venv.sh):
    python fuzz/make_gguf_seed.py
"""

from pathlib import Path

import gguf
import numpy as np

out = Path(__file__).parent / "corpus" / "gguf" / "tiny-llama.gguf"
out.parent.mkdir(parents=True, exist_ok=True)
w = gguf.GGUFWriter(str(out), "llama")
h, ff, vocab = 8, 16, 4
w.add_context_length(32)
w.add_embedding_length(h)
w.add_block_count(1)
w.add_feed_forward_length(ff)
w.add_head_count(2)
w.add_head_count_kv(2)
w.add_layer_norm_rms_eps(1e-5)
w.add_rope_freq_base(10000.0)
w.add_tokenizer_model("gpt2")
w.add_token_list(["a", "b", "c", "ab"])
w.add_token_types([1, 1, 1, 1])
w.add_token_merges(["a b"])
w.add_bos_token_id(0)
w.add_eos_token_id(1)
rng = np.random.default_rng(0)
t = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
w.add_tensor("token_embd.weight", t(vocab, h))
w.add_tensor("output_norm.weight", np.ones(h, np.float32))
for name, shape in [("attn_q", (h, h)), ("attn_k", (h, h)), ("attn_v", (h, h)), ("attn_output", (h, h)), ("ffn_gate", (ff, h)), ("ffn_up", (ff, h)), ("ffn_down", (h, ff))]:
    w.add_tensor(f"blk.0.{name}.weight", t(*shape))
w.add_tensor("blk.0.attn_norm.weight", np.ones(h, np.float32))
w.add_tensor("blk.0.ffn_norm.weight", np.ones(h, np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(out, out.stat().st_size, "bytes")
