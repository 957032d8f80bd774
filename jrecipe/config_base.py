"""The base ConfigDict every config file starts from: every field a user may override.

Config files in `configs/` call `base_config()` and change a few fields; the entry point
locks the result so a mistyped override is an error, not a silently ignored value.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All fields jrecipe reads, with the recipe's defaults (fixed seed, constant Adam 3e-4)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # 'Fix the random seed': init, data order, dropout and augmentation derive from it.

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.data_dir = ""  # '' = $JRECIPE_DATA_DIR or ~/.cache/jrecipe/tfds
  c.data.normalize = True
  c.data.train_subset = 0  # 0 = the whole train split
  c.data.downsample = 0  # average-pool images by this factor ('smaller input dimensionality')
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.random_crop = 0  # pad pixels; 0 = off ('Simplify: no augmentation yet')
  c.data.augment.hflip = False

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "softmax_xent"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.momentum = 0.9
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.rms_decay = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"  # the recipe: no hidden decay; tune decay at the very end
  c.schedule.unit = "epochs"
  c.schedule.warmup = 0
  c.schedule.boundaries = ()
  c.schedule.every = 0
  c.schedule.decay_factor = 0.1
  c.schedule.decay_rate = 0.0
  c.schedule.end_value = 0.0
  c.schedule.decay_steps = 0

  c.momentum_schedule = ml_collections.ConfigDict()
  c.momentum_schedule.name = "constant"
  c.momentum_schedule.unit = "epochs"
  c.momentum_schedule.start = 0.5
  c.momentum_schedule.end = 0.99
  c.momentum_schedule.decay_steps = 0

  c.plateau = ml_collections.ConfigDict()
  c.plateau.enabled = False  # reduce-on-plateau, driven by the validation loss each epoch
  c.plateau.factor = 0.5
  c.plateau.patience = 2
  c.plateau.min_scale = 1e-3

  c.l2 = 0.0  # L2 regularisation strength added to the loss: 0.5 * l2 * sum(w^2) over kernels
  c.ema_decay = 0.999  # exponential moving average of the parameters; 0 = off
  c.init_bias = True  # 'init well': final-layer bias from class priors / target mean

  c.batch_size = 128  # global batch size (split over devices and hosts)
  c.eval_batch_size = 1000
  c.num_epochs = 20.0  # may be fractional (a search stage of half an epoch)
  c.early_stopping_patience = 0  # epochs without validation-loss improvement; 0 = off
  c.log_every_steps = 50
  c.eval_splits = ("validation",)  # evaluated every epoch; 'test' is evaluated at the end

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep_best = 2  # best K by validation loss, kept beside the latest

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = "mesh"  # 'mesh' (jit over a device mesh), 'pmap', or 'single'
  c.parallel.num_devices = 0  # 0 = all local devices
  c.parallel.distributed = False  # jax.distributed.initialize() for multi-host jobs

  c.checks = ml_collections.ConfigDict()
  c.checks.only = ""  # comma-separated check names; '' = the whole battery
  c.checks.skip = ""  # comma-separated check names to leave out
  c.checks.budget_steps = 150  # steps per short training run (baselines, capacity, ...)
  c.checks.batch_size = 32  # batch of those short runs (small: they only compare budgets)
  c.checks.overfit_examples = 10  # 'overfit one batch': 2 to 20 examples
  c.checks.overfit_steps = 500
  c.checks.gradcheck_examples = 4
  c.checks.gradcheck_burnin_steps = 20

  c.ensemble = ml_collections.ConfigDict()  # --mode=ensemble ('squeeze out the juice')
  c.ensemble.members = ""  # comma-separated run work directories (or one run / search dir)
  c.ensemble.source = "runs"  # 'runs' | 'checkpoints' | 'ema' | 'search'
  c.ensemble.k = 5
  c.ensemble.steps = ""
  c.ensemble.combine = "prob"  # 'prob' (mean of probabilities) | 'logit'
  c.ensemble.split = "test"
  c.ensemble.distill_steps = 0  # > 0: distil the ensemble into this config's model
  c.ensemble.temperature = 4.0
  c.ensemble.alpha = 0.5
  c.ensemble.distill_lr = 1e-3

  # Each section below is owned by one mode; keep a field's comment to one line.
  # --- inspect (--mode=inspect: 'become one with the data') ---
  c.inspect = ml_collections.ConfigDict()
  # --- end inspect ---

  # --- monitor (babysitting during training) and report (--mode=report) ---
  c.monitor = ml_collections.ConfigDict()
  # --- end monitor ---

  # --- search (--mode=search) and lr_find (--mode=lr_find): 'tune' ---
  c.search = ml_collections.ConfigDict()
  c.lr_find = ml_collections.ConfigDict()
  # --- end search ---

  # --- init_from, ablate, label (issue 10: the recipe's middle stages) ---
  c.init_from = ""  # a run work directory or checkpoint to initialise parameters from
  c.ablate = ml_collections.ConfigDict()
  c.label = ml_collections.ConfigDict()
  # --- end issue 10 ---

  c.debug_nans = False  # on a non-finite step, rerun it under jax_debug_nans to name the op
  c.progress = True  # progress bar with ETA on the console
  return c
