"""Models: a registry of factories and adapters from Flax Linen / NNX to one pure-apply API.

    model = build_model(config.model, spec)          # config.model.name = 'mlp', 'cnn', ...
    variables = model.init(rng, x)                    # {'params': ..., ['batch_stats': ...]}
    logits = model.apply(variables, x)                # eval mode
    logits, state = model.apply_with_state(variables, x, True, {'dropout': key})

Registered: linear, mlp, cnn, resnet18, resnet50, transformer, rnn, nnx_mlp; or any
'package.module:factory' with `factory(spec, bn_axis_name, **fields)` returning a Linen
module, an NNX module or a `jrecipe.types.Model`.
"""

from jrecipe.models.core import MODELS, build_model, example_input, output_dim, register_model
from jrecipe.models.linen_adapter import from_linen
from jrecipe.models.nnx_adapter import from_nnx
from jrecipe.models import cnn, linear, mlp, nnx_mlp, resnet, sequence  # noqa: F401  (register)

__all__ = ["MODELS", "build_model", "example_input", "from_linen", "from_nnx", "output_dim",
           "register_model"]
