"""Torch executor: model loading and splitting, stage workers, KV cache, training.

Import the submodules you need (`lemix.engine.model`, `lemix.engine.worker`, ...); this package
file imports nothing so that `import lemix.engine` stays cheap.
"""
