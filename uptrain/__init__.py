"""Uptraining: a plain PyTorch loop on Accelerate that trains a converted checkpoint for a fraction of its original steps."""
