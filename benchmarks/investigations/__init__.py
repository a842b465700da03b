"""Finished investigations: one folder per question, its scripts, result files and NOTES.md."""
