"""Drop-in module replacements and the one list of patches that patch_model applies."""
