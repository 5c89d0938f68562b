"""Where files live and what they hold: paths and URIs, output that appears whole, the run folder, the Kaggle CSV and submission formats, the MNIST source and `digits data`.

Imports only the base modules (config, errors).
"""
