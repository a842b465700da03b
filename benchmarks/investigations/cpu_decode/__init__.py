"""See NOTES.md."""
