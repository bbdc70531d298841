"""What runs the patched model: the CUDA-graph cache, device-side indices, the block pipeline, the
scheduler, streaming decode and the video loop."""
