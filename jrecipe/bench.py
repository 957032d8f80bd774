"""`python -m jrecipe.bench`: the benchmark's entry point (the code is bench/framework.py).

The benchmark lives outside the package, in the repository's bench/ folder, beside the other
stand-alone benchmarks; this thin entry keeps the documented command working from a source
checkout (the folder is not installed with the package).
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run() -> None:
  if not os.path.isfile(os.path.join(REPO, "bench", "framework.py")):
    sys.stderr.write("jrecipe: error: python -m jrecipe.bench needs a source checkout of "
                     f"jrecipe (bench/framework.py beside the package; not found under {REPO}).\n")
    sys.exit(2)
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from absl import app
  from bench import framework
  app.run(framework.main)


if __name__ == "__main__":
  run()
