"""Kernel microbenchmarks and end-to-end runs (`longlive-bench`)."""
