"""Counterfactual route scoring: the scorer and its settings, the keys/values of the standard
pass and attention over them, route sampling, the brute-force reference and the score CLI
(docs/method.md). Importing the package loads nothing heavy; `score_config` needs no torch.
"""
