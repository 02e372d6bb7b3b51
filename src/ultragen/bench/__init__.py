"""Benchmarks (not tests): run through ``ultragen bench ...``; each writes one JSON file under bench/results/."""
