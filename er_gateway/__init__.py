"""Qwen3 embedding & reranker gateway for vLLM."""

__version__ = "0.1.0"
