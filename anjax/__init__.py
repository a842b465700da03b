"""anjax: Anchor-based LLMs in JAX/Flax.

Packages, imports flowing one way (docs/DESIGN.md, "Package map"; tests/test_imports.py):
core -> text -> io -> {inference, train} -> eval -> cli. The modules at this level are only
the shims behind `python -m anjax.<command>`.
"""
