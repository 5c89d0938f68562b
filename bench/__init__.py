"""Benchmarks of the digits system against plain Keras, run as `python -m bench`."""
