"""Models in and out: Hugging Face directories, GGUF, run directories and checkpoints, model-argument loading."""
