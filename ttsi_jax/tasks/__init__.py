"""Benchmarks as tasks: examples, prompts, candidate actions, parsing and checking."""
