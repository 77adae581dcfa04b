"""Evaluation: perplexity, fidelity to the source model, KV-cache and speed figures, and the ablation runner."""
