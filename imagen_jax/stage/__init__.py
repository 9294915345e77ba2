"""A cascade stage: its modules, weights, checkpoints, sampling program and image output.

Training, the cascade pipeline and evaluation all build on this package; it imports none of them.
"""
