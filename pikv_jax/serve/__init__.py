"""Serving: continuous batching over a fixed pool of cache slots sized from a memory budget."""
