"""LlamaForCausalLM -> mm_jax "lm" family: logits, greedy tokens and bfloat16 against transformers."""
import transformers

import hf_tiny

V = 256


def build():
  """The tiny random Llama (also the export round trip's, tests/test_export_hf.py)."""
  # Llama 3 RoPE scaling with a short original context, so all three frequency bands occur
  # (wavelengths 2pi .. 2pi * 5e5 across head_dim 32: above 64 divided, 16..64 blended, below kept).
  config = transformers.LlamaConfig(
      vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  return hf_tiny.build(transformers.LlamaForCausalLM, config)


def test_llama3_rope_gqa_untied(tmp_path):
  r = hf_tiny.check_lm(build(), tmp_path, V)
  print(r)
  assert r["max_diff"] <= 1e-4
  assert r["bf16_rel"] <= 2e-2
  assert r["greedy"][0] == r["greedy"][1]
