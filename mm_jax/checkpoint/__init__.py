"""Checkpoints: the orbax manager with manifests and retention (manager), file integrity and the workdir
lock (integrity), params loaded by name from other checkpoints (parts)."""
from mm_jax.checkpoint.manager import Checkpoints, OtherLayout, layout, relayout, signature, workdir_path
