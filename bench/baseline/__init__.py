"""Baselines for the reservation API: the same request shape, the least work in front of Redis."""
