"""Serving: continuous batching over fixed decode slots (scheduler) behind an OpenAI-compatible API (api)."""
