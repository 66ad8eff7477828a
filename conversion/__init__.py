"""Training checkpoints <-> Hugging Face folders."""
