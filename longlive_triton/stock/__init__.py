"""Importers of the stock LongLive source (generator, VAE, text encoder), to run beside ours.

`longlive1.py`: LongLive v1.0's generator; `longlive2.py`: LongLive 2.0's generator and inference pipeline;
`source.py`: what they share (finding the tree and telling the families apart, bare packages, stand-ins).
"""
