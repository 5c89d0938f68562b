"""Batch scoring on Ray Data, and what reads its output: evaluation and the report.

Imports nets/, runtime/, storage/ and the base modules; never training/ or the CLI.
"""
