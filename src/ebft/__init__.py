"""ebft: Energy-Based Fine-Tuning of Hugging Face causal language models (Jelassi et al., 2026)."""

__version__ = "0.1.0"
