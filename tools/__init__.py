"""Tools run from the repository root with `python -m tools.<name>`: the scorer's benchmark,
the bundled tiny model's training and evaluation, the bf16 margin measurement, the CPU torch
installer. Not part of the installed packages; nothing in them is imported by a run.
"""
