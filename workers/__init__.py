"""What runs inside a work unit: plain functions and classes over files and Arrow tables.

Nothing here imports Ray, Hydra or W&B; the core needs only torch, transformers and pyarrow,
so every stage can be run and tested on its own, on a laptop or a bare GPU box.
"""
