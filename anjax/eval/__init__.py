"""Evaluation: benchmark tasks, accuracy/C-reduction/T-speed-up tables, perplexity, the lm-eval adapter."""
