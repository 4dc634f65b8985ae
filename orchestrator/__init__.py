"""The driver: compose config, plan work units, dispatch them on Ray, resume, report.

The only package that imports Ray, Hydra and W&B.
"""
