"""The planted-bug zoo: every entry is a silent bug, its correct twin, where the published
fault taxonomies file it, the check made for it and the cause the battery must name first.

An entry is a set of config overrides on a shipped config (`base`): the bug and the twin
differ only in the planted mistake, and both plug in through jrecipe's user contracts
(a model factory, a loss function, an optimizer factory, a data function, an augmentation
function, all in this package), so `--mode=check` sees them as it sees a user's code.

Taxonomy classes (abbreviations used in `taxonomy`):
  H   Humbatova et al., 'Taxonomy of real faults in deep learning systems', ICSE 2020
      (Model / Layers / Activation, Tensors & Inputs, Training / Loss, Optimiser,
      Hyperparameters, Preprocessing of training data, Training data quality, ...).
  I   Islam et al., 'A comprehensive study on deep learning bug characteristics', FSE 2019
      (API bug, Coding bug, Data bug, Structural bug: data flow, initialization, logic, ...).
  T   TrainCheck, 'Training with confidence', OSDI 2025: silent training errors (optimizer
      not updating some parameters, dropout/BatchNorm mode, randomness, data pipeline).
  D   DeepLocalize (ICSE 2021) and AUTOTRAINER (ICSE 2021) benchmark classes (wrong
      activation, wrong loss, wrong initialisation, learning rate, missing preprocessing,
      dying ReLU, vanishing gradients).
"""

import dataclasses

M, L, O, DATA = ("jrecipe.zoo.models:", "jrecipe.zoo.losses:", "jrecipe.zoo.optimizers:",
                 "jrecipe.zoo.data:")
OFF = "jrecipe.zoo.official:"  # models written as Flax's and big_vision's examples write them
DIGITS = "digits_mlp.py"
SEQ = "digits_seq_transformer.py:smoke"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One planted bug and its twin.

  Attributes:
    name: stable name (the `--only` flag).
    kind: 'model', 'loss', 'optimizer' or 'data'.
    taxonomy: the taxonomy classes (module docstring's abbreviations).
    check: the check made for this bug: it must FAIL (exit 1).
    cause: the check the battery's first line must name as the most likely cause.
    bug, twin: config overrides ({'model': {...}} replaces the section; 'a.b' sets a field).
    base: the shipped config the overrides apply to.
    what: the bug in one line.
  """

  name: str
  kind: str
  taxonomy: str
  check: str
  bug: dict
  twin: dict
  what: str
  base: str = DIGITS
  cause: str = ""

  @property
  def root(self) -> str:
    return self.cause or self.check


def _model(factory, check, taxonomy, what, bug, *, cause="", base=DIGITS, extra=None,
           module=M):
  extra = extra or {}
  return Entry(f"{factory}.{bug}", "model", taxonomy, check,
               {"model": {"name": module + factory, "bug": bug}, **extra},
               {"model": {"name": module + factory}, **extra}, what, base, cause)


def _field(kind, field, prefix, name, twin, check, taxonomy, what, *, cause="", extra=None):
  extra = extra or {}
  twin_extra = extra.get("twin", extra)
  bug_extra = {k: v for k, v in extra.items() if k != "twin"}
  base = {"model": {"name": M + "linen_mlp"}}
  return Entry(f"{kind}.{name}", kind, taxonomy, check,
               {**base, field: prefix + name, **bug_extra},
               {**base, field: prefix + twin, **twin_extra}, what, DIGITS, cause)


MODEL = [
    _model("linen_mlp", "batch_independence", "H: Tensors&Inputs/wrong shape; I: SB data flow",
           "reshape to (features, batch) and transpose back: examples mix", "batch_mixing_reshape"),
    _model("linen_mlp", "logits_not_probabilities", "H: Model/Layers/activation (redundant "
           "softmax); I: API bug; D: wrong activation", "softmax on the output, log_softmax in "
           "the loss", "softmax_output"),
    _model("linen_mlp", "overfit_one_batch", "H: Model/Layers/activation; D: wrong activation",
           "tanh on the logits: they cannot leave [-1, 1]", "tanh_output"),
    _model("linen_mlp", "nonlinearity", "H: Model/Layers/missing activation; "
           "D: wrong activation", "no nonlinearity between the Dense layers: a linear model",
           "missing_nonlinearity"),
    _model("linen_mlp", "eval_mode", "H: Model/Layers/layer properties; T: dropout mode",
           "dropout deterministic=False at eval", "dropout_at_eval"),
    _model("linen_mlp", "gradient_check", "H: Training/training process; T: parameters not "
           "updated", "stop_gradient after the first layer: it never learns", "frozen_layer"),
    _model("linen_mlp", "input_independent_baseline", "H: Model/wrong initialisation; I: SB "
           "initialization; D: wrong initialisation", "zero-initialised kernels: ReLU units "
           "dead, symmetry never broken", "zero_init"),
    _model("linen_mlp", "loss_at_init", "H: Model/wrong initialisation; D: wrong "
           "initialisation (exploding)", "kernels drawn with std 10", "huge_init"),
    _model("linen_mlp", "input_independent_baseline", "I: SB data flow; H: Tensors&Inputs/"
           "wrong input", "the model reads a zeros placeholder instead of x", "ignores_input"),
    _model("linen_mlp", "dropout_varies", "T: randomness; H: Model/Layers/layer properties",
           "the dropout mask drawn from PRNGKey(0) at every step", "fixed_dropout_key"),
    _model("linen_mlp", "gradient_check", "I: Coding bug; H: Model/Layers (custom layer)",
           "a custom_vjp whose derivative is 5% too large", "wrong_custom_vjp"),
    _model("linen_mlp", "input_independent_baseline", "T: parameters not updated; H: "
           "Training process", "stop_gradient on the logits: nothing can learn",
           "detached_output"),
    _model("nnx_bn_mlp", "eval_mode", "T: BatchNorm mode; H: Model/Layers/layer properties",
           "self.bn(h, use_running_average=False): batch statistics at eval",
           "batch_stats_at_eval"),
    _model("linen_bn_mlp", "state_updates", "T: BatchNorm statistics; H: Model/Layers/layer "
           "properties", "BatchNorm momentum 1.0 (PyTorch's 0.0 confused): stats never move",
           "stats_never_update"),
    _model("linen_cnn", "batch_independence", "H: Tensors&Inputs/wrong shape; I: SB data flow",
           "flatten with the batch axis last (NCHW habits)", "flatten_mixes_batch"),
    _model("linen_cnn", "batch_independence", "H: Model/Layers; I: SB logic",
           "features centred over the batch axis (axis=0)", "pool_over_batch"),
    _model("nnx_mlp", "batch_independence", "H: Tensors&Inputs; I: SB data flow",
           "h - h.mean(axis=0): features normalised over the batch", "batch_centering"),
    _model("nnx_mlp", "logits_not_probabilities", "H: Model/Layers/activation; I: API bug",
           "nnx.softmax on the output, log_softmax in the loss", "softmax_output"),
    _model("nnx_mlp", "eval_mode", "T: dropout mode; I: API bug",
           "self.dropout(h, deterministic=False): .eval() is overridden", "dropout_at_eval"),
    _model("nnx_mlp", "dropout_varies", "T: randomness; I: API bug",
           "self.dropout(h, rngs=nnx.Rngs(dropout=0)): one mask forever",
           "fixed_dropout_rngs"),
    _model("nnx_mlp", "gradient_check", "T: parameters not updated; I: SB data flow",
           "jax.lax.stop_gradient on the hidden layer: linear1 never learns",
           "hidden_detached"),
    _model("causal_lm", "causal_dependency", "H: Model/Layers/layer properties; I: SB logic",
           "causal mask tril(k=1): position t sees t+1", "causal_mask_one_ahead", base=SEQ),
    _model("causal_lm", "causal_dependency", "H: Model/Layers/missing layer property; I: SB "
           "logic", "no causal mask: the next token is in view", "no_causal_mask", base=SEQ),
]

_SHIFT = {"model": {"name": OFF + "lm1b_decoder", "shifts_inputs": True}}
OFFICIAL = [
    _model("flax_resnet", "state_updates", "T: BatchNorm statistics; H: Model/Layers/layer "
           "properties", "use_running_average=True written into one BatchNorm of Flax's "
           "ImageNet ResNet: it never learns statistics", "bn_frozen_layer", module=OFF),
    _model("flax_resnet", "batch_independence", "H: Tensors&Inputs/wrong shape; I: SB data "
           "flow", "ImageNet ResNet pooled through reshape(h*w, n, c).mean(0): examples mix",
           "pool_view_mixes_batch", module=OFF, cause="eval_mode"),
    _model("bv_vit", "dropout_varies", "T: randomness; H: Model/Layers/layer properties",
           "big_vision ViT (zero head) whose dropout masks come from PRNGKey(0)",
           "fixed_dropout_key", module=OFF),
    _model("bv_vit", "logits_not_probabilities", "H: Model/Layers/activation (redundant "
           "softmax); I: API bug", "big_vision ViT with a softmax after its zero head",
           "softmax_head", module=OFF),
    Entry("lm1b_decoder.pad_mask_on_real_token", "model", "H: Model/Layers/layer properties; "
          "I: SB logic", "causal_dependency",
          {"model": {**_SHIFT["model"], "bug": "pad_mask_on_real_token"}}, _SHIFT,
          "LM1B's inputs > 0 padding mask on digit sequences, where 0 is a pixel value", SEQ),
    Entry("lm1b_decoder.shifts_inputs_unset", "model", "I: API bug; H: Tensors&Inputs/wrong "
          "input", "causal_dependency", {"model": {"name": OFF + "lm1b_decoder"}}, _SHIFT,
          "LM1B's decoder (shift_right inside) plugged in without model.shifts_inputs=True: "
          "output t never sees token t", SEQ),
]

_LOSS = "H: Training/loss function; D: wrong loss"
LOSS = [
    _field("loss", "loss.name", L, "mean_over_classes", "xent", "loss_at_init",
           _LOSS + "; I: SB logic", "mean over the classes where the sum belongs: loss / C"),
    _field("loss", "loss.name", L, "summed_over_batch", "xent", "loss_at_init",
           _LOSS + " (normalisation)", "each example's loss times the batch size"),
    _field("loss", "loss.name", L, "log_softmax_over_batch", "xent", "loss_at_init",
           _LOSS + "; H: Tensors&Inputs/wrong axis", "log_softmax over axis 0 (the batch)"),
    _field("loss", "loss.name", L, "labels_off_by_one", "xent", "loss_at_init",
           _LOSS + "; I: Data bug", "one_hot(labels - 1)"),
    _field("loss", "loss.name", L, "mse_on_logits", "xent", "loss_at_init",
           _LOSS + " (wrong loss for the task)", "mean squared error on the logits"),
    _field("loss", "loss.name", L, "negated", "xent", "loss_at_init",
           _LOSS + "; I: Coding bug", "the minus sign dropped"),
    _field("loss", "loss.name", L, "softmax_inside_loss", "xent", "overfit_one_batch",
           _LOSS + "; H: redundant softmax", "softmax before a loss applying log_softmax"),
    _field("loss", "loss.name", L, "smoothing_of_one", "xent", "input_independent_baseline",
           _LOSS + "; H: Hyperparameters", "label smoothing alpha=1.0: uniform targets"),
]

_OPT = "H: Training/optimiser; T: optimizer"
_HYPER = "H: Training/hyperparameters (learning rate); D: learning rate"
OPTIMIZER = [
    _field("optimizer", "optimizer.name", O, "per_step_decay", "adam", "effective_schedule",
           _HYPER, "exponential decay meant per epoch applied per step"),
    _field("optimizer", "optimizer.name", O, "cosine_in_epochs", "adam", "effective_schedule",
           _HYPER, "cosine decay_steps in epochs (20) to a per-step schedule"),
    _field("optimizer", "optimizer.name", O, "warmup_longer_than_run", "adam",
           "effective_schedule", _HYPER, "a 10,000-step warm-up in a 450-step run"),
    _field("optimizer", "optimizer.name", O, "decay_after_adam", "adamw_kernels",
           "weight_decay", _OPT + " (weight decay sign)", "add_decayed_weights after the "
           "learning rate: the weights grow"),
    _field("optimizer", "optimizer.name", O, "adamw_decays_biases", "adamw_kernels",
           "weight_decay", _OPT + " (weight decay leaves)", "optax.adamw without a mask"),
    _field("optimizer", "optimizer.name", O, "decay_too_strong", "adamw_kernels",
           "weight_decay", _OPT + "; H: hyperparameters", "weight_decay=100: a percentage "
           "read as a fraction"),
    _field("optimizer", "optimizer.name", O, "first_layer_frozen", "adam",
           "effective_schedule", "T: parameters not updated; H: Training process",
           "multi_transform freezes the first layer of a model trained from scratch"),
    _field("optimizer", "optimizer.name", O, "gradient_ascent", "adam", "effective_schedule",
           _OPT + "; I: Coding bug", "scale(learning_rate) where scale(-learning_rate) belongs"),
    _field("optimizer", "optimizer.name", O, "boundary_at_step_zero", "adam",
           "effective_schedule", _HYPER + "; I: Coding bug", "a decay boundary {0: 0.0}: rate 0"),
    _field("optimizer", "optimizer.name", O, "learning_rate_far_too_high", "adam",
           "input_independent_baseline", _HYPER + "; D: exploding", "SGD at 10,000x the "
           "rate (the first check that trains sees the divergence and says 'too high')"),
]

_DATA = "H: Training/training data quality; I: Data bug"
_PRE = "H: Training/preprocessing of training data; I: Data bug; D: missing preprocessing"
_SPLIT = "H: Training/preprocessing of training data (held-out splits); I: Data bug"
_RAW = {"data.normalize": False, "twin": {"data.normalize": False}}
DATA_ENTRIES = [
    _field("data", "data.name", DATA, "labels_shuffled", "digits", "input_independent_baseline",
           _DATA + "; T: data pipeline", "training labels shuffled apart from the inputs"),
    _field("data", "data.name", DATA, "labels_shifted", "digits", "input_independent_baseline",
           _DATA, "labels one example out of step with their inputs"),
    _field("data", "data.name", DATA, "test_in_train", "digits", "split_leakage",
           _DATA + " (leakage)", "the test split concatenated into the training split"),
    _field("data", "data.name", DATA, "heldout_unscaled", "digits", "splits_match", _SPLIT,
           "training pixels divided by 16, the held-out splits' left at 0..16"),
    _field("data", "data.name", DATA, "heldout_transposed", "digits", "splits_match", _SPLIT,
           "the held-out images read transposed ([N, W, H, C])"),
    _field("data", "data.name", DATA, "split_before_shuffle", "digits", "splits_match",
           _DATA + " (split)", "the split taken from examples sorted by label"),
    _field("data", "data.name", DATA, "heldout_labels_shifted", "digits",
           "input_independent_baseline", _DATA + " (held-out labels)",
           "held-out labels one class off ((y + 1) % 10): another class map in that split"),
    _field("data", "data.name", DATA, "integer_division", "digits", "data_before_net", _PRE,
           "uint8 // 255: every input 0"),
    _field("data", "data.name", DATA, "per_pixel_std", "digits", "data_before_net", _PRE,
           "per-pixel standardisation divides 0 by 0 on blank pixels"),
    _field("data", "data.name", DATA, "pixels_0_255", "digits_unit", "data_before_net", _PRE,
           "pixels 0..255 never standardised (data.normalize=False)", extra=_RAW),
    _field("data", "data.name", DATA, "first_example_everywhere", "digits", "data_before_net",
           _DATA + "; I: Coding bug", "every training input overwritten by the first"),
    _field("data", "data.augment.fn", DATA, "vertical_flip", "shift_one_pixel",
           "augmentation_keeps_labels", _PRE + " (augmentation)", "vertical flips of digits"),
    _field("data", "data.augment.fn", DATA, "rotate_90", "shift_one_pixel",
           "augmentation_keeps_labels", _PRE + " (augmentation)", "90-degree turns of digits"),
    _field("data", "data.augment.fn", DATA, "noise_drowns_signal", "shift_one_pixel",
           "augmentation_keeps_labels", _PRE + " (augmentation)", "noise std 10 (meant 0.1)"),
    _field("data", "data.augment.fn", DATA, "shift_fixed_key", "shift_one_pixel",
           "augmentation_varies", "T: randomness; H: preprocessing", "the shift drawn from "
           "PRNGKey(0): the same augmentation every step"),
]

ENTRIES = MODEL + OFFICIAL + LOSS + OPTIMIZER + DATA_ENTRIES
BY_NAME = {e.name: e for e in ENTRIES}
assert len(BY_NAME) == len(ENTRIES), "zoo entry names must be unique"
