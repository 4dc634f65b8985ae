"""The router update: preference pairs from the scores, a router-only update of one MoE layer,
and its hyperparameters (`update_config`, read by the driver without torch).
"""
