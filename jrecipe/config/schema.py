"""Every config field jrecipe reads, declared once: default, type, valid values, one-line doc.

`base_config()` (jrecipe.config.base) is generated from these sections, `jrecipe.validate`
checks every field against them, and docs/config.md is generated from them
(`python -m jrecipe.config.reference > docs/config.md`). To add a field: declare it here,
read it where it is used (as an attribute of the locked config), regenerate docs/config.md.

The `model` section is open: beyond `name`, its fields are the keyword arguments of the chosen
model factory (jrecipe.models), so a config sets `c.model.hidden = (256, 256)` for 'mlp'; the
factory checks them, and `jrecipe.validate` adds the dropout-rate check every model shares.
"""

from jrecipe.config.fields import Field as F, Section

MAX_SEED = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits: larger seeds collide with smaller ones

# Fields jrecipe once had and no longer reads: a config that sets one is refused with the
# reason, and a config.json of an older run loads without it (jrecipe.config.base.from_json).
REMOVED = {
    "eval_splits": "nothing ever read it (training evaluates the validation split every "
                   "epoch and the test split once at the end). Drop it from the config",
}

_NAME = "a registered name or an import path 'package.module:Name'"
_UNIT = dict(lo=0, hi=1, hi_open=True)  # a probability or a decay coefficient: [0, 1)
_POS = dict(lo=0, lo_open=True)  # a positive number: (0, inf)
_NONNEG = dict(lo=0)  # a count or a number >= 0

TOP = Section("", "Top-level fields: the seed, the batch, the run's length and regularisers.", {
    "seed": F(0, "'Fix the random seed': init, data order, dropout and augmentation derive "
              "from it.", lo=0, hi=MAX_SEED,
              why="jax.random.PRNGKey keeps 32 bits, so larger seeds would silently equal "
                  "smaller ones."),
    "batch_size": F(128, "Global batch size (split over devices and hosts).", lo=1,
                    why="It is the global batch, split over every device."),
    "eval_batch_size": F(1000, "Examples per evaluation batch (the last batch is masked).",
                         lo=1, why="It is the number of examples per evaluation batch."),
    "num_epochs": F(20.0, "Length of the run in epochs; may be fractional (half an epoch).",
                    **_POS, why="It may be fractional (0.5 = half an epoch); to continue a run, "
                                "raise it."),
    "l2": F(0.0, "L2 regularisation added to the loss: 0.5 * l2 * sum(w^2) over kernels.",
            **_NONNEG, why="It is the L2 strength added to the loss; 0 turns it off."),
    "ema_decay": F(0.999, "Decay of the exponential moving average of the parameters; 0 = off.",
                   **_UNIT, why="It is the decay of the parameters' moving average (e.g. 0.999); "
                                "0 turns it off."),
    "init_bias": F(True, "'Init well': the final-layer bias from class priors / target mean."),
    "early_stopping_patience": F(0, "Epochs without validation-loss improvement before "
                                 "stopping; 0 = off.", **_NONNEG,
                                 why="It counts epochs without validation improvement; 0 turns "
                                     "early stopping off."),
    "log_every_steps": F(50, "Training metrics are averaged and written every this many steps.",
                         lo=1),
    "debug_nans": F(False, "On a non-finite step, rerun it under jax_debug_nans to name the op."),
    "progress": F(True, "Progress bar with ETA on the console."),
    "precision": F("float32", "Compute dtype: 'float32', 'bfloat16' or 'float16' (dynamic loss "
                   "scaling); parameters, optimizer state, loss and metrics stay float32.",
                   choices="jrecipe.precision:PRECISIONS",
                   why="bfloat16 is the accelerators' mixed precision (docs/performance.md)."),
})

INIT_FROM = Section("", "Transfer: initialise parameters from another run (top-level fields).", {
    "init_from": F("", "A run work directory or checkpoint to initialise parameters from; '' = "
                   "off."),
    "init_from_checkpoint": F("latest", "Which checkpoint of a run directory: 'latest', 'best' "
                              "or a step number."),
    "init_from_skip": F("", "Comma-separated regexes of parameter paths left fresh (e.g. "
                        "'head')."),
    "init_from_freeze": F(False, "Restored parameters get zero updates (an optax mask)."),
    "init_from_allow_partial": F(False, "Allow restoring fewer than half of the parameters."),
}, title="init_from")

DATA = Section("data", "The dataset and its preprocessing (jrecipe.data).", {
    "name": F("digits", f"The dataset: {_NAME}, or 'tfds:NAME' for a TFDS dataset."),
    "data_dir": F("", "Where datasets are prepared; '' = $JRECIPE_DATA_DIR or "
                  "~/.cache/jrecipe/tfds."),
    "normalize": F(True, "Standardise inputs with the training split's mean and std."),
    "train_subset": F(0, "Keep only the first N training examples (a fixed split); 0 = all.",
                      **_NONNEG),
    "downsample": F(0, "Average-pool images by this factor ('smaller input dimensionality'); "
                    "0 or 1 = off.", **_NONNEG),
    "context_length": F(0, "Text datasets (stdlib_bytes): bytes per window the model reads "
                        "(targets: the next byte at each); 0 = the dataset's default (128).",
                        **_NONNEG, why="It is a number of bytes, >= 2; 0 takes the dataset's "
                                       "default."),
    "pipeline": F("auto", "'memory' reads splits whole; 'stream' reads records per batch "
                  "(docs/streaming.md); 'auto' streams a 'tfds:' dataset whose copy in memory "
                  "(~5x its files) exceeds memory_budget_mb.",
                  choices="jrecipe.data.dataset:PIPELINES"),
    "memory_budget_mb": F(4096, "The memory a dataset may take in memory before "
                          "pipeline='auto' streams it (MB).", type=int, lo=1),
    "stream_prefetch": F(4, "Streaming: batches read ahead of the training step.", lo=1),
    "stream_threads": F(2, "Streaming: reader threads (decoding, batching) in this process.",
                        lo=1),
    "stream_inspect_sample": F(20000, "Streaming: --mode=inspect analyses a seeded sample of "
                               "this many examples per split (exact duplicates: all).", lo=1),
    "stream_row_cache_mb": F(1024, "Streaming: a decoded copy of the inputs beside the dataset "
                             "(far faster to read than small ArrayRecords) when they fit in "
                             "this many MB; 0 = never (docs/streaming.md).", **_NONNEG),
    "stream_workers": F(0, "Streaming: grain worker processes for reading and decoding; 0 = "
                        "threads only (faster on a 2-core CPU, docs/streaming.md).", **_NONNEG),
})

AUGMENT = Section("data.augment", "Training-time augmentation ('Simplify: no augmentation "
                  "yet'; add it when regularising).", {
    "random_crop": F(0, "Pad by this many pixels and crop back at a random offset; 0 = off.",
                     **_NONNEG, why="It is the padding in pixels; 0 turns it off."),
    "hflip": F(False, "Random horizontal flips."),
    "crop_mode": F("reflect", "Padding of random_crop: 'reflect', 'constant' (zeros: the "
                   "training mean after normalisation) or 'edge'.",
                   choices="jrecipe.data.augmentation:CROP_MODES"),
    "fn": F("", "Your own augmentation/preprocessing 'package.module:function', `fn(x, y, rng) "
            "-> (x, y)` on a train batch inside the jitted step, after crop/flip; '' = none."),
})

MODEL = Section("model", "The model: `name` chooses the factory; every other field of this "
                "section is a keyword argument of that factory (e.g. hidden, activation, "
                "dropout for 'mlp'; see jrecipe/models), checked by the factory itself.", {
    "name": F("mlp", f"The model factory: {_NAME}."),
}, open=True)

LOSS = Section("loss", "The loss (jrecipe.losses).", {
    "name": F("softmax_xent", f"The loss: {_NAME}."),
})

OPTIMIZER = Section("optimizer", "The optimizer (jrecipe.optim): CS231n's parameter updates.", {
    "name": F("adam", f"The optimizer: {_NAME} (a factory taking learning_rate)."),
    "learning_rate": F(3e-4, "Base learning rate (Adam at 3e-4 is the recipe's safe start; "
                       "1.0 for 'lbfgs').", **_POS,
                       why="A rate of 0 never moves the parameters; try 1e-3 for Adam, 0.1 for "
                           "SGD."),
    "momentum": F(0.9, "Momentum coefficient of 'momentum' and 'nesterov'.", **_UNIT),
    "b1": F(0.9, "Adam/AdamW first-moment decay.", **_UNIT),
    "b2": F(0.999, "Adam/AdamW second-moment decay.", **_UNIT),
    "eps": F(1e-8, "Denominator guard of Adam, AdamW, RMSProp and Adagrad.", **_POS),
    "rms_decay": F(0.9, "RMSProp's decay of the squared-gradient cache.", **_UNIT),
    "weight_decay": F(0.0, "Decoupled weight decay, 'adamw' only (others: use l2).", **_NONNEG),
    "grad_clip_norm": F(0.0, "Clip gradients to this global norm; 0 = off.", **_NONNEG),
})

_DURATION = dict(type=float, **_NONNEG)  # an int default (0), but fractional epochs are fine

SCHEDULE = Section("schedule", "The learning-rate schedule (jrecipe.optim): constant unless "
                   "the config says otherwise ('don't trust learning rate decay defaults').", {
    "name": F("constant", "'constant', 'step', 'exponential', 'inverse_time', 'cosine', "
              "'warmup_cosine' or 'linear'."),
    "unit": F("epochs", "Unit of warmup, boundaries, every and decay_steps.",
              choices="jrecipe.optim:UNITS",
              why="It is the unit of schedule's durations (warmup, boundaries, decay_steps)."),
    "warmup": F(0, "Linear warm-up length; 0 = none.", **_DURATION),
    "boundaries": F((), "'step': increasing times at which the rate is multiplied by "
                    "decay_factor.", item=float),
    "every": F(0, "'step', instead of boundaries: multiply by decay_factor every this long.",
               **_DURATION),
    "decay_factor": F(0.1, "The 'step' multiplier.", **_POS),
    "decay_rate": F(0.0, "k of 'exponential' and 'inverse_time' (per unit; > 0 there).",
                    **_NONNEG),
    "end_value": F(0.0, "Final value of 'cosine', 'warmup_cosine' and 'linear', as a fraction "
                   "of the base rate.", **_NONNEG),
    "decay_steps": F(0, "When 'cosine'/'linear' reach their end value (from step 0); 0 = the "
                     "whole run.", **_DURATION),
})

MOMENTUM_SCHEDULE = Section("momentum_schedule", "The momentum coefficient's schedule, "
                            "'momentum' and 'nesterov' only (CS231n: annealed 0.5 -> 0.99).", {
    "name": F("constant", "'constant' (optimizer.momentum throughout), 'linear' or 'cosine'."),
    "unit": F("epochs", "Unit of decay_steps.", choices="jrecipe.optim:UNITS",
              why="It is the unit of momentum_schedule's durations (warmup, boundaries, "
                  "decay_steps)."),
    "start": F(0.5, "Momentum at step 0.", **_UNIT),
    "end": F(0.99, "Final momentum of 'linear' and 'cosine' (absolute).", **_UNIT),
    "decay_steps": F(0, "When the end value is reached; 0 = the whole run.", **_DURATION),
})

PLATEAU = Section("plateau", "Reduce-on-plateau, driven by the validation loss each epoch.", {
    "enabled": F(False, "Cut the learning rate when the validation loss stops improving."),
    "factor": F(0.5, "Multiplier of the learning rate at each plateau.", lo=0, hi=1,
                lo_open=True, hi_open=True,
                why="It multiplies the learning rate at each plateau (0.5 halves it)."),
    "patience": F(2, "Epochs without improvement that make a plateau.", lo=1,
                  why="It is a number of epochs."),
    "min_scale": F(1e-3, "The learning rate is never cut below this fraction of its base.", lo=0,
                   hi=1, lo_open=True),
})

CHECKPOINT = Section("checkpoint", "Checkpoints (orbax) of the run's state.", {
    "every_epochs": F(1, "Save every this many epochs; 0 = only at the end (and on preemption).",
                      **_NONNEG, why="0 saves only at the end (and on preemption)."),
    "keep_best": F(2, "Keep the best K checkpoints by validation loss beside the latest.",
                   **_NONNEG),
})

PARALLEL = Section("parallel", "Where the step runs (jrecipe.train.parallel).", {
    "mode": F("mesh", "'mesh' (jit over a device mesh), 'pmap', or 'single'.",
              choices="jrecipe.train.parallel:MODES"),
    "num_devices": F(0, "Devices to use; 0 = every local device.", **_NONNEG,
                     why="0 uses every device."),
    "distributed": F(False, "Call jax.distributed.initialize() for a multi-host job."),
    "cpu_devices": F(0, "CPU-only host: host devices to create; 0 = auto by model family.",
                     **_NONNEG),
})

PROFILE = Section("profile", "Profiling a run (jrecipe.profile): a jax.profiler trace of some "
                  "steps, their time, FLOPs and model FLOPs utilisation.", {
    "steps": F("", "'START:END': trace global steps START+1..END into DIR/profile (TensorBoard "
               "profile plugin, Perfetto); '' = off. Start after step 0 to skip the compile."),
    "peak_tflops": F(0.0, "The device's peak TFLOP/s for MFU; 0 = from jrecipe.profile's table "
                     "of accelerators, or a measured matmul peak on CPU.", **_NONNEG),
})

CHECKS = Section("checks", "--mode=check: the recipe's battery of checks (jrecipe.checks).", {
    "only": F("", "Comma-separated check names to run; '' = the whole battery."),
    "skip": F("", "Comma-separated check names to leave out."),
    "budget_steps": F(150, "Steps per short training run (baselines, capacity, ...).", lo=1),
    "batch_size": F(32, "Batch of those short runs (small: they only compare budgets).", lo=1),
    "overfit_examples": F(10, "'Overfit one batch': examples in the batch (2 to 20).", lo=1),
    "overfit_steps": F(500, "Steps of the overfit-one-batch run.", lo=1),
    "gradcheck_examples": F(4, "Examples of the numerical gradient check.", lo=1),
    "gradcheck_burnin_steps": F(20, "Training steps before the gradient check.", **_NONNEG),
})

ENSEMBLE = Section("ensemble", "--mode=ensemble ('squeeze out the juice'): members, how they "
                   "are combined, and optional distillation into this config's model.", {
    "members": F("", "Comma-separated run work directories (or one run / search directory)."),
    "source": F("runs", "'runs' (one member per run), 'checkpoints' (of one run), 'ema' (a "
                "run's raw and EMA weights) or 'search' (its best trials).",
                choices="jrecipe.ensemble.mode:SOURCES"),
    "k": F(5, "source='search': the number of best trials to combine.", lo=1),
    "steps": F("", "source='checkpoints': comma-separated steps; '' = every checkpoint."),
    "combine": F("prob", "'prob' (mean of probabilities) or 'logit' (mean of logits).",
                 choices="jrecipe.ensemble.evaluate:COMBINES"),
    "split": F("test", "Split the ensemble and its members are evaluated on.",
               choices="jrecipe.data.pipeline:SPLITS"),
    "distill_steps": F(0, "> 0: distil the ensemble into this config's model for this many "
                       "steps (on the train split).", **_NONNEG),
    "temperature": F(4.0, "Distillation temperature of the teacher's and student's softmax.",
                     **_POS),
    "alpha": F(0.5, "Weight of the distillation loss (1 - alpha: the labels' loss).", lo=0, hi=1),
    "distill_lr": F(1e-3, "Learning rate of the distillation (Adam).", **_POS),
})

INSPECT = Section("inspect", "--mode=inspect: 'become one with the data', and the model's "
                  "mistakes after training.", {
    "filter": F("", "Rows to select, e.g. 'label==3 and std<2' (columns of examples.csv)."),
    "sort_by": F("", "Column to sort the selection by, e.g. 'std'; '' = table order."),
    "descending": F(True, "sort_by largest first."),
    "top_k": F(32, "Examples listed per finding and drawn per selection/mistakes grid.", lo=1),
    "outlier_k": F(8, "Examples drawn at each end of each axis in outliers.png.", lo=1),
    "samples_per_class": F(10, "Random examples per class in samples.png.", lo=1),
    "near_dup_threshold": F(0.985, "Verified cosine similarity at or above which a pair is a "
                            "near duplicate.", lo=-1, hi=1,
                            why="It is a cosine similarity (default 0.985; higher finds fewer "
                                "pairs)."),
    "near_dup_neighbors": F(8, "Candidate neighbours per example in the near-duplicate search.",
                            lo=1),
    "max_shift": F(1, "Translation (pixels) the near-duplicate similarity tolerates.", **_NONNEG),
    "label_neighbors": F(10, "k of the leave-one-out k-NN vote for label errors; 0 = off.",
                         **_NONNEG),
    "value_range": F((), "Declared (min, max) of the stored inputs; () = observed over all "
                     "splits.", item=float),
    "mistakes": F("auto", "Model mistakes: 'auto' (if DIR has checkpoints), 'on' or 'off'.",
                  choices=("auto", "on", "off")),
    "split": F("test", "Split whose mispredictions are shown after training."),
})

MONITOR = Section("monitor", "Babysitting during training, and the report (--mode=report).", {
    "enabled": F(True, "Babysitting instruments and diagnoses; False = the plain loop only."),
    "every_steps": F(100, "Per-leaf gradient/parameter/update norms and update ratios every "
                     "this many steps; 0 = never.", **_NONNEG),
    "probe_every_steps": F(200, "Histograms, dead and saturated units; 0 = at init only.",
                           **_NONNEG),
    "probe_examples": F(256, "Fixed training examples the probe looks at.", lo=1),
    "images_every_epochs": F(0, "Filter-grid and prediction PNG cadence; 0 = auto (about 6 per "
                             "run).", **_NONNEG),
    "prediction_examples": F(16, "Fixed test examples for prediction dynamics; 0 = off.",
                             **_NONNEG),
    "step_losses": F(True, "Every step's training loss in metrics.jsonl (split 'train_steps')."),
    "ratio_low": F(1e-4, "Median update/weight ratio below this: learning rate likely too low.",
                   **_POS),
    "ratio_high": F(1e-2, "Median update/weight ratio above this: learning rate likely too "
                    "high.", **_POS),
    "report": F(True, "Write report.html at the end of training (--mode=report rebuilds it)."),
    "report_loss_scale": F("both", "Loss curves in the report: 'linear', 'log' or 'both'.",
                           choices="jrecipe.report.mode:LOSS_SCALES"),
})

SEARCH = Section("search", "--mode=search: 'tune' with random, quasi-random or TPE search, "
                 "coarse to fine over stages.", {
    "space": F("", "'field=loguniform(a,b); field=uniform(a,b); field=int(a,b); ...'."),
    "stages": F("20x1", "Coarse to fine: 'TRIALSxEPOCHS,...', e.g. '30x0.5,10x3,5x10'."),
    "keep_top": F(5, "Stage k narrows each range around the best trials of stage k-1.", lo=1),
    "sampler": F("random", "'random' (Bergstra & Bengio), 'quasirandom' (scrambled Sobol) or "
                 "'tpe' (Bayesian)."),
    "pruner": F("none", "Stop unpromising trials early: 'none', 'median' or "
                "'successive_halving' (Optuna's), on the validation metric of each evaluation.",
                choices=("none", "median", "successive_halving"),
                why="These are the pruners jrecipe wires to Optuna's."),
    "scientific": F("", "Space fields whose effect is studied (comma-separated); the other "
                    "space fields are nuisance, optimised out in the isolation plots."),
    "fixed": F("", "Config fields held fixed for the study (comma-separated), recorded with "
               "their values in search.json."),
    "scientific_bins": F(5, "Bins of a numeric scientific field in its isolation plot.", lo=2),
    "storage": F("", "'' = sqlite:///DIR/study.db; postgresql+psycopg://... for many hosts."),
    "study_name": F("", "'' = the name drawn once and kept in DIR/study.json (workers with "
                    "another DIR must pass it)."),
    "workers": F(1, "Local worker processes launched by the master.", lo=1),
    "metric": F("accuracy", "Validation metric to maximise ('loss' is minimised).",
                choices=("accuracy", "loss"),
                why="It is a metric the validation split reports."),
    "explode_factor": F(3.0, "Train loss above this times the loss at init: the trial "
                        "diverged.", **_POS),
    "stuck_seconds": F(300.0, "The master kills a worker whose trial is silent this long.",
                       **_POS),
    "heartbeat_seconds": F(5, "Worker heartbeat in the database (stale after 10x: requeued).",
                           type=float, **_POS),
    "edge_fraction": F(0.1, "Warn when the best value is in this outer fraction of its range.",
                       lo=0, hi=0.5),
    "max_retries": F(2, "A trial whose worker died is requeued at most this many times.",
                     **_NONNEG),
    "monitor_trials": F(False, "Babysitting and report.html in every trial (costs time)."),
})

LR_FIND = Section("lr_find", "--mode=lr_find: the learning-rate range test.", {
    "min_lr": F(1e-7, "First learning rate of the range test.", **_POS),
    "max_lr": F(10.0, "Last learning rate (the test stops early once the loss explodes).",
                **_POS),
    "steps": F(200, "Steps, the rate growing by a constant factor each step.", lo=20,
               why="Fewer steps are too few to read a curve: use 100 to 500."),
    "smoothing": F(0.1, "EMA weight of the new loss in the smoothed (bias-corrected) curve.",
                   lo=0, hi=1, lo_open=True, hi_open=True),
    "stop_factor": F(4.0, "Stop when the smoothed loss exceeds this times its minimum.", lo=1,
                     lo_open=True),
})

ABLATE = Section("ablate", "--mode=ablate: 'complexify only one at a time' (see "
                 "docs/recipe_middle.md).", {
    "variants": F((), "\"name: a.b=1, c=2 -> better [by 2]\" strings, one change each (or one "
                  "string separated by ';').", type=(tuple, str), item=str),
    "kind": F("add", "'add': each variant adds to the base; 'remove': removes from the full "
              "config.", choices="jrecipe.ablate.mode:KINDS"),
    "seeds": F(3, "Seeds per variant (config.seed, +1, ...): the effect's spread.", lo=1),
    "metric": F("accuracy", "Validation metric compared: 'accuracy' or 'loss'.",
                choices="jrecipe.ablate.mode:METRICS"),
})

LABEL = Section("label", "--mode=label: the human baseline (you label a random sample).", {
    "num_examples": F(50, "Random examples of the split to label.", lo=1,
                      why="A sample needs at least 1 example."),
    "split": F("test", "Split the sample is drawn from."),
    "second_pass": F(0, "Examples of the sample shown again for self-agreement; -1 = all.",
                     lo=-1, why="It is 0 (none), a count, or -1 (the whole sample again)."),
    "scale": F(0, "Terminal columns per image pixel; 0 = auto (about 32 columns).", **_NONNEG),
})

# In the order of docs/config.md. Top-level sections share the path ''.
SECTIONS = (TOP, DATA, AUGMENT, MODEL, LOSS, OPTIMIZER, SCHEDULE, MOMENTUM_SCHEDULE, PLATEAU,
            CHECKPOINT, PARALLEL, PROFILE, CHECKS, INIT_FROM, ENSEMBLE, INSPECT, MONITOR, SEARCH,
            LR_FIND, ABLATE, LABEL)


def fields():
  """(dotted path, Field) of every declared field, in the reference's order."""
  for section in SECTIONS:
    for name, f in section.fields.items():
      yield section.dotted(name), f


FIELDS = dict(fields())
SECTION_PATHS = tuple(dict.fromkeys(s.path for s in SECTIONS if s.path))


def field(dotted: str) -> F:
  """The Field at a dotted path ('optimizer.learning_rate'); KeyError if none."""
  return FIELDS[dotted]


def default(dotted: str):
  """The default of the field at a dotted path."""
  return FIELDS[dotted].default


def is_open(path: str) -> bool:
  """Whether section `path` takes fields beyond its declared ones (the model's)."""
  return any(s.open for s in SECTIONS if s.path == path)
