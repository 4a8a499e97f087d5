"""Evaluation of nested embeddings: nearest neighbours, retrieval metrics, probes."""
