"""The networks: architectures, augmentation layers, the checked model-file loader, export.

Imports runtime/, storage/ and the base modules.
"""
