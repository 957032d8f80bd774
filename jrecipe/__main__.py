"""`python -m jrecipe ...` is the same as the `jrecipe` command."""

from jrecipe.main import run

if __name__ == "__main__":
  run()
