"""Shipyard: export, prune, quantize, build and parity-gate fine-tuned BERT models."""

__version__ = "0.1.0"
