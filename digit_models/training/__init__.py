"""Distributed training on Ray Train: the driver (driver.py), what runs on each worker (worker.py), its callbacks, schedule, checkpoints and records.

Imports nets/, runtime/, storage/ and the base modules; never scoring/ or the CLI.
"""
