"""Integrations: transformers' attention registry (``hf``), vLLM (``vllm``), lm-evaluation-harness
(``lm_eval``)."""
