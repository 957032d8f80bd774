"""The CS231n gradient check: analytic gradients against centred differences, in float64.

CS231n, "gradient checks": compare the analytic gradient with the numeric one,
(f(x+h) - f(x-h)) / 2h with h about 1e-5, by the relative error |a - n| / max(|a|, |n|)
(passing when both are zero). Above 1e-2 the gradient is probably wrong; 1e-4..1e-2 is
uncomfortable; below 1e-4 is fine with kinks, but for smooth functions (tanh, softmax) 1e-4
is already too high; below 1e-7 is good. The procedure, as implemented here:

- double precision: parameters and inputs are cast to float64 inside a `jax.enable_x64`
  context that restores the previous setting on exit (nothing leaks into the process);
- a few coordinates of EVERY parameter leaf, biases included (they are a tiny share of one
  flat vector and random coordinates would miss them);
- the data loss and the regularisation loss are checked separately (two tables), so that
  regularisation cannot hide a wrong data gradient;
- randomness is held fixed by the caller: bind the same dropout key into the loss for
  f(x+h), f(x-h) and the analytic gradient (`gradient_check_model` does it);
- kinks: an optional `kink_fn` returns the "winners" (ReLU sign patterns, argmaxes); a
  coordinate whose pattern differs between x+h and x-h crossed a kink and is counted rather
  than failed (`relu_pattern` builds one for Linen models);
- the active float range: coordinates whose gradients are below 1e-10 are reported with
  their raw analytic and numeric values; when both are within float64 roundoff of zero
  (100 ulp of the loss / h) they are not compared (e.g. a bias before BatchNorm, whose
  true gradient is 0); if every coordinate is, the check warns (scale the loss up);
- double precision is verified, not assumed: a loss that comes out float32 from float64
  parameters (an `astype(float32)` in the model or loss) makes the check a warn
  ("inconclusive"), naming the cast's likely place;
- a systematic error (analytic = r x numeric on every sampled coordinate of a leaf, r != 1)
  is a fail even when r is within 1e-2 (a backward rule scaled wrong, e.g. by 1.01);
- `jax.test_util.check_grads` (one random direction, float64) is run as well and its outcome
  recorded; its default step moves every parameter at once and so often crosses ReLU kinks,
  so a failure is retried with smaller steps (1e-5, 1e-6) before it counts.

Check in a characteristic mode: the battery runs a short burn-in (a few optimizer steps)
before calling `gradient_check_model`, because at initialisation some gradients are
atypically small or the kinks atypically placed. Use few datapoints (fewer kinks, faster):
`gradient_check_model` keeps at most 8 examples.

Modules: `measure` (float64, the flat parameter vector, centred differences, check_grads),
`rules` (per-leaf tables, thresholds, the verdict), `plot` (error against h), `check`
(`gradient_check`), `model` (`gradient_check_model`, `relu_pattern`, the battery's check).
"""

from jrecipe.checks.gradcheck.check import gradient_check
from jrecipe.checks.gradcheck.measure import float64
from jrecipe.checks.gradcheck.model import gradient_check_model, relu_pattern
from jrecipe.checks.gradcheck.rules import EXCELLENT_BELOW, FAIL_ABOVE, WARN_ABOVE

__all__ = ["EXCELLENT_BELOW", "FAIL_ABOVE", "WARN_ABOVE", "float64", "gradient_check",
           "gradient_check_model", "relu_pattern"]
