"""Where the mnist5k CNN's training step spends its time on this CPU, part by part (issue 9).

    python bench/cnn_budget.py [--batch 64] [--repeats 7] [--xla_defaults]

The question it answers: why jrecipe's CNN step (and the hand-written jax.jit loop, which runs
the same XLA program) is not 1.2x PyTorch's on this CPU. It times, in one process with
jrecipe's XLA:CPU flags for the 'cnn' family (`--xla_defaults`: without them), each part of
one training step as its own jitted function, on one device at `--batch` examples (64: the
per-device batch of the default 2-device split of batch 128):

- the whole step: jrecipe's CNN module (jrecipe/models/cnn.py), softmax cross-entropy,
  value_and_grad, optax.adam: the hand loop's step (`python -m jrecipe.bench`);
- conv_0 (1 -> 32 channels, 28x28): forward and weight gradient (the input needs none);
- conv_1 (32 -> 64 channels, 14x14): forward, input gradient and weight gradient;
- dense (3136 -> 256) and head (256 -> 10): forward, input and weight gradients;
- the element-wise and pooling work around the convolutions: bias add, ReLU and 2x2 average
  pool of both conv layers, forward and backward, on conv outputs of the real shapes, with the
  model's pool (`jrecipe.models.cnn.avg_pool2`) and, for comparison, with `nn.avg_pool`;
- the Adam update of every parameter (0.87M).

For the convolutions and matmuls it prints the GFLOP/s they reach (2 * MACs / seconds) and the
fraction of this machine's float32 matmul peak (numpy, by the clock, measured in the same
run). Medians of `--repeats` timings of 10 calls each; parts are interleaved round by round.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--xla_defaults", action="store_true",
                  help="run with XLA's own CPU flags instead of jrecipe's for 'cnn'")
  args = ap.parse_args()

  from jrecipe import runtime
  if args.xla_defaults:
    os.environ[runtime.ENV_XLA_DEFAULTS] = "1"
  flags = runtime.tune_cpu_xla("cnn")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import linen as nn
  from jax import lax

  from bench.framework import matmul_peak_gflops
  from jrecipe.models.cnn import CNN, avg_pool2

  b = args.batch
  rng = np.random.default_rng(0)

  def arr(*shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

  dn = ("NHWC", "HWIO", "NHWC")

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

  module = CNN(num_outputs=10)
  x, y = arr(b, 28, 28, 1), jnp.asarray(rng.integers(0, 10, b))
  params = module.init(jax.random.PRNGKey(0), x[:2])["params"]
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  def step(p, o, x, y):
    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  def adam_only(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  def conv0(x, w, g):  # forward and the weight gradient
    out, vjp = jax.vjp(lambda w: conv(x, w), w)
    return out, vjp(g)[0]

  def conv1(x, w, g):  # forward, input and weight gradients
    out, vjp = jax.vjp(conv, x, w)
    return out, vjp(g)

  def dense(h, w1, w2, g):
    def f(h, w1, w2):
      return nn.relu(h @ w1) @ w2
    out, vjp = jax.vjp(f, h, w1, w2)
    return out, vjp(g)

  def around_convs(pool):
    def around(c0, b0, c1, b1, g0, g1):  # bias + ReLU + avg pool, both layers, fwd + bwd
      def f(c0, b0, c1, b1):
        return pool(nn.relu(c0 + b0)), pool(nn.relu(c1 + b1))
      out, vjp = jax.vjp(f, c0, b0, c1, b1)
      return out, vjp((g0, g1))
    return around

  grads = jax.tree.map(jnp.ones_like, params)
  around = (arr(b, 28, 28, 32), arr(32), arr(b, 14, 14, 64), arr(64), arr(b, 14, 14, 32),
            arr(b, 7, 7, 64))
  parts = {
      "whole step": (step, (params, opt, x, y), None),
      "conv_0 fwd + weight grad": (conv0, (x, arr(3, 3, 1, 32, scale=0.3),
                                           arr(b, 28, 28, 32)), 2 * 2 * b * 28 * 28 * 32 * 9),
      "conv_1 fwd + input + weight grads": (conv1, (arr(b, 14, 14, 32), arr(3, 3, 32, 64, scale=0.1),
                                                    arr(b, 14, 14, 64)),
                                            3 * 2 * b * 14 * 14 * 64 * 9 * 32),
      "dense + head fwd + bwd": (dense, (arr(b, 3136), arr(3136, 256, scale=0.02),
                                         arr(256, 10, scale=0.06), arr(b, 10)),
                                 3 * 2 * b * (3136 * 256 + 256 * 10)),
      "bias + ReLU + avg pool, fwd + bwd": (around_convs(lambda a: avg_pool2(a, 2)), around,
                                            None),
      "Adam update (0.87M parameters)": (adam_only, (params, opt, grads), None),
  }
  reference = "  (the same with nn.avg_pool)"
  parts[reference] = (around_convs(
      lambda a: nn.avg_pool(a, (2, 2), strides=(2, 2), padding="SAME")), around, None)
  jitted = {}
  for name, (fn, a, _) in parts.items():
    jitted[name] = jax.jit(fn)
    jax.block_until_ready(jitted[name](*a))
    jax.block_until_ready(jitted[name](*a))

  times = {name: [] for name in parts}
  for _ in range(args.repeats):
    for name, (_, a, _) in parts.items():
      f = jitted[name]
      t = time.perf_counter()
      for _ in range(10):
        out = f(*a)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / 10)
  peak = matmul_peak_gflops()["wall"]

  print(f"mnist5k CNN training step by part, batch {b} on 1 CPU device, "
        f"{runtime.host_cores()} cores; XLA:CPU flags: {' '.join(flags) or '(XLA defaults)'}")
  print(f"float32 matmul peak (numpy, by the clock): {peak:.0f} GFLOP/s")
  whole = float(np.median(times["whole step"]))
  total = 0.0
  for name, (_, _, flops) in parts.items():
    med = float(np.median(times[name]))
    lo, hi = min(times[name]), max(times[name])
    line = f"  {name:36s} {med * 1e3:7.2f} ms ({lo * 1e3:.2f}-{hi * 1e3:.2f})"
    if name not in ("whole step", reference):
      total += med
      line += f"  {med / whole * 100:5.1f}% of the step"
    if flops:
      line += f"  {flops / med / 1e9:6.1f} GFLOP/s = {flops / med / 1e9 / peak * 100:4.0f}% of peak"
    print(line)
  print(f"  {'sum of the parts':36s} {total * 1e3:7.2f} ms  {total / whole * 100:5.1f}% of the "
        "step (the rest: loss, softmax, the flatten and XLA's scheduling across fusions)")


if __name__ == "__main__":
  main()
