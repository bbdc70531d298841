"""YAML presets for patch_model; load them with longlive_triton.config.load_preset."""
