"""The training loop and what it needs: data order, checkpoints, validation, launch, on-policy sampling."""
