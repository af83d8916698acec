"""Rollouts from a vLLM server: the HTTP client, LoRA hot-loading, full-weight transfer, and
``ebft vllm-serve``."""
