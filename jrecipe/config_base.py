"""The base ConfigDict every config file starts from: every field a user may override.

Config files in `configs/` call `base_config()` and change a few fields; the entry point
locks the result so a mistyped override is an error, not a silently ignored value.
"""

import ml_collections


def from_json(d: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from its JSON form (config.json): JSON lists back to tuples (model.hidden)."""

  def tuples(v):
    if isinstance(v, dict):
      return {k: tuples(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(tuples(x) for x in v)
    return v

  return ml_collections.ConfigDict(tuples(d))


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
  c.parallel.cpu_devices = 0  # CPU-only host: host devices to create; 0 = auto by model family

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
  c.inspect.filter = ""  # rows to select, e.g. 'label==3 and std<2' (columns of examples.csv)
  c.inspect.sort_by = ""  # column to sort the selection by, e.g. 'std'; '' = table order
  c.inspect.descending = True  # sort_by largest first
  c.inspect.top_k = 32  # examples listed per finding and drawn per selection/mistakes grid
  c.inspect.outlier_k = 8  # examples drawn at each end of each axis in outliers.png
  c.inspect.samples_per_class = 10  # random examples per class in samples.png
  c.inspect.near_dup_threshold = 0.985  # verified similarity at or above which pairs are near-dups
  c.inspect.near_dup_neighbors = 8  # candidate neighbours per example in the near-dup search
  c.inspect.max_shift = 1  # translation (pixels) the near-dup image similarity tolerates
  c.inspect.label_neighbors = 10  # k of the leave-one-out k-NN vote for label errors; 0 = off
  c.inspect.value_range = ()  # declared (min, max) of stored inputs; () = observed, all splits
  c.inspect.mistakes = "auto"  # model mistakes: 'auto' (if DIR has checkpoints), 'on', 'off'
  c.inspect.split = "test"  # split whose mispredictions are shown after training
  # --- end inspect ---

  # --- monitor (babysitting during training) and report (--mode=report) ---
  c.monitor = ml_collections.ConfigDict()
  c.monitor.enabled = True  # babysitting instruments and diagnoses; False = the plain loop only
  c.monitor.every_steps = 100  # per-leaf grad/param/update norms and update ratios; 0 = never
  c.monitor.probe_every_steps = 200  # histograms, dead/saturated units; 0 = at init only
  c.monitor.probe_examples = 256  # fixed training examples the probe looks at
  c.monitor.images_every_epochs = 0  # filter grid and prediction PNG cadence; 0 = auto (~6 per run)
  c.monitor.prediction_examples = 16  # fixed test examples for prediction dynamics; 0 = off
  c.monitor.step_losses = True  # every step's training loss in metrics.jsonl (split 'train_steps')
  c.monitor.ratio_low = 1e-4  # median update/weight ratio below this: learning rate likely too low
  c.monitor.ratio_high = 1e-2  # median update/weight ratio above this: learning rate likely too high
  c.monitor.report = True  # write report.html at the end of training (--mode=report rebuilds it)
  c.monitor.report_loss_scale = "both"  # loss curves in the report: 'linear', 'log' or 'both'
  # --- end monitor ---

  # --- search (--mode=search) and lr_find (--mode=lr_find): 'tune' ---
  c.search = ml_collections.ConfigDict()
  c.search.space = ""  # 'field=loguniform(a,b); field=uniform(a,b); field=int(a,b); ...'
  c.search.stages = "20x1"  # coarse -> fine: 'TRIALSxEPOCHS,...', e.g. '30x0.5,10x3,5x10'
  c.search.keep_top = 5  # stage k narrows each range around the best trials of stage k-1
  c.search.sampler = "random"  # 'random' (Bergstra & Bengio) | 'tpe' (Bayesian)
  c.search.storage = ""  # '' = sqlite:///DIR/study.db; postgresql+psycopg://... for many hosts
  c.search.study_name = ""  # '' = the basename of DIR (workers elsewhere must use the same)
  c.search.workers = 1  # local worker processes launched by the master
  c.search.metric = "accuracy"  # validation metric to maximise ('loss' is minimised)
  c.search.explode_factor = 3.0  # train loss above this x the loss at init: trial diverged
  c.search.stuck_seconds = 300.0  # the master kills a worker whose trial is silent this long
  c.search.heartbeat_seconds = 5  # worker heartbeat in the database (stale after 10x: requeued)
  c.search.edge_fraction = 0.1  # warn when the best value is in this outer fraction of its range
  c.search.max_retries = 2  # a trial whose worker died is requeued at most this many times
  c.search.monitor_trials = False  # babysitting and report.html in every trial (costs time)
  c.lr_find = ml_collections.ConfigDict()
  c.lr_find.min_lr = 1e-7  # first learning rate of the range test
  c.lr_find.max_lr = 10.0  # last learning rate (the test stops early once the loss explodes)
  c.lr_find.steps = 200  # steps, the rate growing by a constant factor each step
  c.lr_find.smoothing = 0.1  # EMA weight of the new loss in the smoothed (bias-corrected) curve
  c.lr_find.stop_factor = 4.0  # stop when the smoothed loss exceeds this x its minimum
  # --- end search ---

  # --- init_from, ablate, label (issue 10: the recipe's middle stages) ---
  c.init_from = ""  # a run work directory or checkpoint to initialise parameters from
  c.init_from_checkpoint = "latest"  # which checkpoint of a run dir: 'latest', 'best' or a step
  c.init_from_skip = ""  # comma-separated regexes of param paths left fresh (e.g. 'head')
  c.init_from_freeze = False  # restored parameters get zero updates (an optax mask)
  c.init_from_allow_partial = False  # allow restoring fewer than half of the parameters
  c.ablate = ml_collections.ConfigDict()  # --mode=ablate: 'complexify only one at a time'
  c.ablate.variants = ()  # "name: a.b=1, c=2 -> better [by 2]" strings (docs/recipe_middle.md)
  c.ablate.kind = "add"  # 'add': each variant adds to the base; 'remove': removes from full
  c.ablate.seeds = 3  # seeds per variant (config.seed, +1, ...): the effect's spread
  c.ablate.metric = "accuracy"  # validation metric compared: 'accuracy' or 'loss'
  c.label = ml_collections.ConfigDict()  # --mode=label: the human baseline
  c.label.num_examples = 50  # random examples of the split to label
  c.label.split = "test"  # split the sample is drawn from
  c.label.second_pass = 0  # examples of the sample shown again for self-agreement; -1 = all
  c.label.scale = 0  # terminal columns per image pixel; 0 = auto (about 32 columns)
  # --- end issue 10 ---

  c.debug_nans = False  # on a non-finite step, rerun it under jax_debug_nans to name the op
  c.progress = True  # progress bar with ETA on the console
  return c
