"""The `longlive-triton` command: generate to mp4, serve the live demo, prompts, prompt embeddings."""
