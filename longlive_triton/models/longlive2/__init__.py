"""The faithful reference of the LongLive 2.0 generator (Wan2.2-TI2V-5B based) and its presets."""
