"""Configs: loading configs/*.py by name (files) and the checks run before any work (validate)."""
