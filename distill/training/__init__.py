"""Training: the loop every model distill trains goes through (loop.py), what it trains on and in what
order (data.py), its checkpoints (checkpoint.py), its validation (validation.py), its distributed
launch (launch.py), on-policy sampling (onpolicy.py), hidden-state distillation (hidden.py) and the
output layer run apart for the fused loss (head.py)."""
