"""LLM backend: transformers causal LMs with HF-generate or vLLM rollouts."""
