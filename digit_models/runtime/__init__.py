"""How TensorFlow and Ray are set up and tamed: thread pools and CPU features, the embedded or joined Ray, the console, interrupts.

Imports storage/ and the base modules (config, errors); never nets/, training/, scoring/ or the CLI.
"""
