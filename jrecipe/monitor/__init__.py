"""Babysitting the learning process (CS231n 'Learning', the recipe's 'visualize everything').

- `overview`: the parameter overview at init (every leaf's shape, size, mean and std).
- `probe`: per-layer activation and gradient histograms, dead ReLUs, saturated tanh/sigmoid
  units, computed by one jitted function on a fixed batch.
- `images`: first-layer weights as an image grid, prediction dynamics on a fixed test batch.
- `recorder`: the `Monitor` the training loop calls at its cadence.
- `diagnose`: plain-language verdicts computed purely from the files of a work directory.
"""
