"""Small configs and subprocess helpers shared by the tests."""

import html.parser
import json
import os
import subprocess
import sys

import numpy as np

from jrecipe import storage
from jrecipe.config_base import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """digits + a small MLP, a few epochs: the cheapest real end-to-end run."""
  c = base_config()
  c.data.name = "digits"
  c.model.name = "mlp"
  c.model.hidden = (32,)
  c.model.activation = "relu"
  c.model.dropout = 0.0
  c.model.init_scale = 1.0
  c.optimizer.learning_rate = 1e-3
  c.num_epochs = 2
  c.batch_size = 64
  c.progress = False
  c.log_every_steps = 5
  return set_fields(c, overrides)


def set_fields(c, overrides: dict):
  """`c` with each dotted field of `overrides` ('model.hidden': (32,)) set."""
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def initial_state(exp, tx=None):
  """The run's initial host TrainState, as training builds it (optionally another optimizer)."""
  from jrecipe.train.trainer import Trainer
  return Trainer.from_experiment(exp, **({"tx": tx} if tx is not None else {})).initial_state()


def run_cli(args, env=None, timeout=300, **kw):
  """Runs `python -m jrecipe args...` and returns the CompletedProcess."""
  e = dict(os.environ)
  e.update(env or {})
  return subprocess.run([sys.executable, "-m", "jrecipe", *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout, **kw)


def load_params(workdir, step=None):
  """The params of the newest (or given) checkpoint of a run, as a flat {path: array} dict."""
  import orbax.checkpoint as ocp
  ckdir = os.path.join(storage.absolute(workdir), "checkpoints")
  mngr = ocp.CheckpointManager(ckdir, item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  import jax
  flat = jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def read_json(path):
  with open(path) as f:
    return json.load(f)


class ReportPage(html.parser.HTMLParser):
  """What report.html contains: section ids, image sources, inline SVGs, external links."""

  def __init__(self):
    super().__init__()
    self.sections, self.images, self.svgs, self.external = [], [], 0, []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "section":
      self.sections.append(a["id"])
    if tag == "img":
      self.images.append(a["src"])
    if tag == "svg":
      self.svgs += 1
    for k in ("src", "href"):
      if a.get(k, "").startswith(("http:", "https:", "//")):
        self.external.append(a[k])
