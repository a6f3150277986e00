"""LeMix: joint scheduling of LLM serving and continuous training on shared multi-GPU nodes."""

__version__ = "0.1.0"
