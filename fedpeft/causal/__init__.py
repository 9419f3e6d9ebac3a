"""Causal language models: prompt/response data, response-only loss, greedy-generation evaluation.

A causal-LM task (`task=causal_lm`, set by the gsm8k and jsonl datasets) trains the adapter on the
response tokens of chat-formatted prompt/response pairs and scores the global adapter by exact
match of the final number in greedily generated answers, plus loss and perplexity.
"""
