"""Training: the loop every model distill trains goes through (loop.py), its distributed launch
(launch.py) and on-policy sampling (onpolicy.py)."""
