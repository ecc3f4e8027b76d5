"""GemmaForCausalLM -> mm_jax "lm" family: logits, greedy tokens and bfloat16 against transformers."""
import transformers

import hf_tiny

V = 256


def build():
  """The tiny random Gemma (also the export round trip's, tests/test_export_hf.py)."""
  # head_dim 24 != width / heads (16); 4 query heads share 2 kv heads; untied head (HF honours it).
  config = transformers.GemmaConfig(
      vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
      eos_token_id=1)
  return hf_tiny.build(transformers.GemmaForCausalLM, config)


def test_gemma_gqa_untied_head_dim_apart_from_width(tmp_path):
  r = hf_tiny.check_lm(build(), tmp_path, V)
  print(r)
  assert r["max_diff"] <= 1e-4
  assert r["bf16_rel"] <= 2e-2
  assert r["greedy"][0] == r["greedy"][1]
