"""The stages, side by side: each is a function of the run and its own recipe section, and no stage module
imports another (they share only the layer below: run, config, store, models, losses, vllm, tracking).
What a stage needs from another, it reads from the run directory."""
