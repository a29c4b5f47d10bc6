"""Benchmarks of hermesd against transformers and accelerate (run from the repository root)."""
