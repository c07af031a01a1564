"""Learning-rate schedules and the AdamW optimizer with its weight-decay mask.

Schedules (step -> learning rate, optax.schedules building blocks):
* 'cosine': linear warmup from 0 to the peak, cosine decay to `min_lr_ratio * peak` at `num_steps`.
* 'wsd' (warmup-stable-decay, the paper's recipe): linear warmup, constant peak, and a linear decay to
  `min_lr_ratio * peak` over the last `decay_fraction` of the steps. A run can be extended from any
  checkpoint of the stable phase, which is why long pretraining runs prefer it.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

# Parameter names (last path element) that get no weight decay: RMSNorm scales, biases, the meta tokens,
# and the SSM's A_log and D (decaying them would pull the state dynamics toward A = -1 and skip = 0).
NO_DECAY = frozenset({"scale", "conv_bias", "dt_bias", "meta_tokens", "A_log", "D"})


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    opt = config.optimizer
    peak, warmup, total = opt.learning_rate, opt.warmup_steps, config.num_steps
    end = peak * opt.min_lr_ratio
    if opt.schedule == "cosine":
        return optax.schedules.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end)
    decay = int(round(opt.decay_fraction * total))
    stable = total - warmup - decay
    return optax.schedules.join_schedules(
        [optax.schedules.linear_schedule(0.0, peak, warmup),
         optax.schedules.constant_schedule(peak),
         optax.schedules.linear_schedule(peak, end, decay)],
        boundaries=[warmup, warmup + stable])


def decay_mask(params) -> dict:
    """True for every parameter that weight decay applies to (by the parameter's name)."""
    def decays(path, _):
        name = path[-1].key
        return name not in NO_DECAY and not name.endswith("bias")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule with decay masked by `decay_mask`."""
    opt = config.optimizer
    adamw = optax.adamw(make_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
    return adamw
