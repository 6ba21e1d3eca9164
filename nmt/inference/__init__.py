"""Inference: greedy and beam search, the translator."""
