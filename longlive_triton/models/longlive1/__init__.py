"""LongLive v1.0 (LongLive-1.3B, Wan2.1-T2V-1.3B): the reference generator and its presets."""
