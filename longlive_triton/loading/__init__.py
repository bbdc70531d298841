"""Checkpoints on this machine: finding the files (never downloading), loading them, merging LoRA."""
