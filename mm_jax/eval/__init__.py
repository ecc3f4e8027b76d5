"""Evaluation from checkpoints (evaluate) and KV-cached decoding (decode)."""
