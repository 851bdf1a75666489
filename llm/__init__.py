"""LLM backend: transformers causal LMs with HF-generate or vLLM rollouts.

The same core exploration step and loss (:mod:`deepgrpo`) that drive the simulator drive a
real causal LM here. Modules:

* :mod:`llm.engine`: the :class:`~llm.engine.RolloutEngine` protocol (token ids in, token ids
  and sampling log-probs out; exact continuation of prompt + prefix ids).
* :mod:`llm.hf_engine`: batched KV-cache sampling on a transformers model.
* :mod:`llm.vllm_engine`: the same protocol on vLLM (prefix caching, weight sync).
* :mod:`llm.models`: local model directories, the ``tiny-arith`` preset (a small Llama built
  from a config with an offline character tokenizer).
* :mod:`llm.tasks`: the arithmetic task, GSM8K/MATH-format loaders, prompt templates.
* :mod:`llm.rewards`: exact match, GSM8K's final-number rule, math-verify.
* :mod:`llm.segmenters`: sentence / line / step / fixed-token segment ends in token space.
* :mod:`llm.backend`: :class:`~llm.backend.LLMBackend`, the core's ``Backend`` protocol.
* :mod:`llm.sft`, :mod:`llm.trainer`, :mod:`llm.evaluate`, :mod:`llm.checkpoint`: supervised
  warm-up, RL training loop, held-out evaluation, checkpoint/resume.
* :mod:`llm.cli`: ``deepgrpo llm {sft,train,eval}``.

transformers, datasets and math-verify are imported lazily (inside functions), so importing
this package or running ``deepgrpo sim`` never loads them.
"""
