"""The planted-bug zoo (issue 18, item 6): silent deep-learning bugs in JAX/Flax user code,
each with a correct twin, run through `--mode=check` by `python -m jrecipe.zoo`.

It lives in the package, not in tests/ or bench/, because its entries are user code plugged
in by import path (`jrecipe.zoo.models:linen_mlp`, ...) exactly as a user's own code is, and
an installed jrecipe can measure its battery on them; the fast consistency test is
tests/test_zoo.py. The scores are in docs/checks.md.
"""
