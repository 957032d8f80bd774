#!/usr/bin/env bash
# The GPU proof (issue 21), ready to run on a machine with a GPU and no network.
#
#   bench/accelerator.sh --download        here, with network: fill bench/wheels (< 64 MiB)
#   bench/accelerator.sh [OUT]             on the GPU machine: install what is missing from
#                                          bench/wheels, run the tests marked `accelerator`,
#                                          then bench/accelerator.py; everything into OUT
#   bench/accelerator.sh --reduced [OUT]   the same on this CPU, tiny
#                                          (tests/test_accelerator_bench.py runs it)
#
# $PYTHON picks the interpreter; $JRECIPE_ACCEL_PYTEST_ARGS and $JRECIPE_ACCEL_BENCH_ARGS add
# arguments to pytest and to bench/accelerator.py (e.g. --runners=jrecipe,hand).
#
# The GPU image holds Python 3.12, JAX with its CUDA plugin, flax, optax, orbax-checkpoint,
# torch, numpy, matplotlib, absl-py, tqdm and pytest; jrecipe runs from this checkout
# (PYTHONPATH), not pip-installed, since its pins name the CPU stack. Each stage has a time
# limit so the whole run stays within 8 minutes; OUT ends with install.log, env.txt,
# pytest.log, the bench's summary.txt, results.json and one log per runner.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/bench/wheels
LIST=$REPO/bench/accelerator_wheels.txt
MODE=gpu
if [[ "${1:-}" == "--download" ]]; then MODE=download; shift; fi
if [[ "${1:-}" == "--reduced" ]]; then MODE=reduced; shift; fi
PY=${PYTHON:-python}
specs() { grep -v '^#' "$LIST" | grep -v '^\s*$'; }

if [[ $MODE == download ]]; then
  mkdir -p "$WHEELS"
  # promise has no wheel on PyPI: build its pure-Python one here.
  $PY -m pip wheel --no-deps -w "$WHEELS" "$(specs | grep -i '^promise==')" || exit 1
  $PY -m pip download --no-deps --dest "$WHEELS" --find-links "$WHEELS" --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any --only-binary=:all: $(specs) || exit 1
  total=$(du -sb "$WHEELS" | cut -f1)
  echo "bench/wheels: $(ls "$WHEELS" | wc -l) wheels, $((total / 1048576)) MiB"
  if (( total >= 64 * 1048576 )); then echo "over the 64 MiB upload" >&2; exit 1; fi
  exit 0
fi

OUT=${1:-$REPO/bench_out/accelerator-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
{ date -u; $PY -V
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())
print('flax', flax.__version__, 'optax', optax.__version__)"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())";
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"; } > "$OUT/env.txt" 2>&1

# 1. What the image lacks, from the carried wheels only (never the network), without deps
#    (they are in the list), so nothing the image has is replaced.
missing=()
for spec in $(specs); do
  name=${spec%%==*}
  $PY -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null \
    || missing+=("$spec")
done
if (( ${#missing[@]} )); then
  if [[ ! -d $WHEELS ]]; then
    echo "missing ${missing[*]} and no bench/wheels: run bench/accelerator.sh --download first" \
      | tee "$OUT/install.log" >&2
  else
    timeout 60 $PY -m pip install --no-index --no-deps --find-links "$WHEELS" "${missing[@]}" \
      > "$OUT/install.log" 2>&1 || echo "install failed: see install.log" >&2
  fi
else
  echo "nothing missing" > "$OUT/install.log"
fi

# 2. The tests marked `accelerator` (train, check, kill-and-resume, mesh, bfloat16).
limit_tests=170; limit_bench=230; bench_args=()
if [[ $MODE == reduced ]]; then limit_tests=200; limit_bench=300; bench_args=(--reduced); fi
timeout $limit_tests $PY -m pytest -q -m accelerator tests/test_accelerator.py \
  ${JRECIPE_ACCEL_PYTEST_ARGS:-} > "$OUT/pytest.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/pytest.log"

# 3. The benchmark, interleaved: jrecipe, a hand-written jax.jit loop, PyTorch.
timeout $limit_bench $PY bench/accelerator.py --out "$OUT" "${bench_args[@]}" \
  ${JRECIPE_ACCEL_BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
bench_rc=$?
cat "$OUT/summary.txt" 2>/dev/null || tail -n 20 "$OUT/bench.log"
echo "tests exit $tests_rc, bench exit $bench_rc; everything in $OUT"
exit $(( tests_rc != 0 || bench_rc != 0 ))
