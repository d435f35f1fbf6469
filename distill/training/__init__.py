"""Training: the loop every model distill trains goes through (loop.py), what it trains on and in what
order (data.py), its checkpoints (checkpoint.py), its validation (validation.py), its distributed
launch (launch.py), on-policy sampling (onpolicy.py) and hidden-state distillation (hidden.py)."""
