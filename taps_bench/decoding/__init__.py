"""Speculative decoding: the engine (prefill, propose, verify, accept), draft trees, sampling, proposers, combiners."""
