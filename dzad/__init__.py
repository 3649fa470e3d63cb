"""DZAD: diffusion-based, prompt-free, zero-shot visual anomaly detection (AAAI 2025)."""

__version__ = "0.1.0"
