"""Polars over score shards: per-token metrics, bins, tables, figures and the report.

Runs without Ray, GPUs or models.
"""
