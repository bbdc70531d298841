"""Importers of the stock LongLive source (generator, VAE, text encoder), to run beside ours."""
