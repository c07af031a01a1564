"""The Hymba language model: embeddings, meta tokens, the layer stack and the tied LM head.

The learned meta tokens are the same for every sequence, so the model runs them as their own pass
(batch 1) and the text as a second pass that starts from the state they leave in every layer: their
keys and values (always visible to the text), the conv inputs and the SSM state. This is the same
computation as running [meta; text] in one sequence, and it is what makes packed documents exact: each
document restarts its positions, attention, conv and SSM from the meta tokens' state.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
from flax.errors import ScopeParamShapeError
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hymba_jax.config import HymbaConfig
from hymba_jax.model.attention import KV, Mask, attention_mask, layer_kind_mask, text_mask
from hymba_jax.model.block import HymbaLayer, LayerState
from hymba_jax.model.norms import RMSNorm
from hymba_jax.model.params import accum_dtype, logical_param
from hymba_jax.ops.attention import STATIC_WINDOW_BACKENDS
from hymba_jax.ops.auto import attention_backend
from hymba_jax.parallel import AxisRules, logical_shardings

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# The outputs of the fused kernels: the Pallas scan and cuDNN attention, forward.
_KERNEL_PRIMITIVES = ("pallas_call", "dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


def save_matmuls_and_kernels(prim, *args, **params) -> bool:
    """The checkpoint policy of `remat="none"` inside a layer scan: keep every matmul and fused-kernel
    output for the backward pass, recompute the elementwise rest.

    Unrolled, XLA fuses a layer's elementwise chains (norms, gates, casts, softplus) into their consumers
    in the forward and the backward, so they are never stored. Inside `lax.scan` every value the backward
    reads is stacked over the iterations and stored: for the 1.5B at 8 x 2048 on one H200 that made the
    step need 152 GiB instead of 98 (docs/performance.md). Recomputing only the elementwise ops restores
    what the unrolled program does; nothing expensive runs twice.
    """
    return jax.checkpoint_policies.dots_saveable(prim, *args, **params) or prim.name in _KERNEL_PRIMITIVES


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) segment ids of packed documents -> (B, T) position of each token inside its document."""
    index = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class HymbaForCausalLM(nn.Module):
    """`apply({"params": p}, input_ids)` -> logits (B, T, vocab) fp32 for the text positions.

    input_ids (B, T) int. segment_ids (B, T) int, optional: packed documents (a new document starts where
    the id changes, also to an id used before); each document is computed exactly as if it were alone. With return_hidden_states,
    also returns the input of every layer and the final-norm output, each (B, M + T, d) with the M meta
    positions in front (the fixtures' definition).

    The parts are methods so that inference can run them separately (`apply(..., method=...)`):
    `embed`, `meta_pass` (the meta tokens' per-layer state), `run_layers` (the layer stack from given
    per-layer prefix states) and `logits`.
    """

    config: HymbaConfig

    def setup(self):
        cfg = self.config
        self.embedding = logical_param(self, "embedding", nn.initializers.normal(cfg.initializer_range),
                                       (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        if cfg.num_meta_tokens:
            self.meta_tokens = logical_param(self, "meta_tokens", nn.initializers.normal(1.0),
                                             (cfg.num_meta_tokens, cfg.hidden_size), ("meta", "embed"),
                                             cfg.param_dtype)
        layer_cls = HymbaLayer if cfg.remat in ("none", "auto") else nn.remat(
            HymbaLayer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        self.layers = [layer_cls(cfg, i) for i in range(cfg.num_layers)]    # named layers_0, layers_1, ...
        self.final_norm = RMSNorm(cfg.rms_norm_eps, "embed", cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = logical_param(self, "lm_head", nn.initializers.normal(cfg.initializer_range),
                                         (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def __call__(self, input_ids: jax.Array, segment_ids: Optional[jax.Array] = None, *,
                 return_hidden_states: bool = False):
        cfg = self.config
        meta_len = cfg.num_meta_tokens
        x = self.embed(input_ids)
        text_index = jnp.arange(input_ids.shape[1])[None]
        if segment_ids is None:
            doc_pos, query_segment = None, None
            positions = meta_len + text_index
        else:
            doc_pos = document_positions(segment_ids)
            # A document is a run of equal ids: an id used again later starts a new document, for attention
            # as for positions, the conv and the SSM (all restart where the id changes).
            positions, query_segment = meta_len + doc_pos, jnp.cumsum(doc_pos == 0, axis=1)
        windows = {cfg.is_global(i): cfg.attention_window(i) for i in range(cfg.num_layers)}
        text_masks = {is_global: text_mask(input_ids.shape[1], window=window, segments=query_segment,
                                           num_prefix=meta_len)
                      for is_global, window in windows.items()}
        xm = meta_states = meta_hidden = None
        if meta_len:
            xm, meta_states, meta_hidden = self.meta_pass(collect_hidden=return_hidden_states)
        x, _, hidden = self.run_layers(x, positions, text_masks, doc_pos, meta_states,
                                       collect_hidden=return_hidden_states, scan=cfg.scan_layers)
        x = self.final_norm(x)
        logits = self.logits(x)
        if not return_hidden_states:
            return logits
        hidden.append(x)
        if meta_len:
            meta_hidden.append(self.final_norm(xm))
            hidden = [self._with_meta(m, h) for m, h in zip(meta_hidden, hidden)]
        return logits, hidden

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, T, d) in the compute dtype. An id outside [0, vocab) (-1 included) embeds as
        NaN, so its logits and loss are NaN rather than another token's: a traced program cannot raise,
        and the programs check ids where they enter (generation, prefill, the data pipeline's tokenizer)."""
        vocab = self.config.vocab_size
        ids = jnp.where(input_ids < 0, vocab, input_ids)          # negative ids would wrap around
        return jnp.take(self.embedding, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(
            jnp.dtype(self.config.dtype))

    def meta_pass(self, collect_hidden: bool = False
                  ) -> tuple[jax.Array, tuple[LayerState, ...], list[jax.Array]]:
        """The meta tokens alone (batch 1, positions 0..M-1): their last hidden state (1, M, d), the
        per-layer state they leave (the prefix of every sequence) and, if asked, every layer's input."""
        meta_len = self.config.num_meta_tokens
        meta_index = jnp.arange(meta_len)[None]
        mask = attention_mask(meta_index, meta_index, window=None)  # M <= any window: both kinds see all
        xm = self.meta_tokens[None].astype(jnp.dtype(self.config.dtype))
        return self.run_layers(xm, meta_index, {True: mask, False: mask}, collect_hidden=collect_hidden,
                               scan=self.config.scan_layers)

    def run_layers(self, x: jax.Array, positions: jax.Array, masks: dict[bool, Mask],
                   doc_pos: Optional[jax.Array] = None, prefix: Optional[Sequence[LayerState]] = None,
                   lengths: Optional[jax.Array] = None, collect_hidden: bool = False, scan: bool = False
                   ) -> tuple[jax.Array, tuple[LayerState, ...], list[jax.Array]]:
        """The layer stack on x (B, T, d) (before the final norm).

        positions (B|1, T) RoPE positions; masks[is_global] (B|1, T, P + T) the attention mask of each layer
        kind over the P prefix keys and the T keys of x (a `TextMask` for a pass over text from position 0,
        which the tile-skipping attention backends need); doc_pos (B, T) or None (see HymbaLayer); prefix:
        per-layer state of the positions before x, K/V held by their owner layers (consumers read their
        producer's), or None; lengths (B,) or None: positions at or after lengths[b] are padding and leave
        the SSM state unchanged. Returns (x, the per-layer state after x: K/V of this pass for owners,
        None for consumers; the inputs of every layer if collect_hidden).

        scan: run the layers as one `lax.scan` whose body is any layer (`uses_one_layer_body`), or else each run
        of repeated layer units as one `lax.scan` (see `layer_runs`), so XLA compiles one layer, or one unit
        per run, instead of every layer. The result is the same. The parameters may come in either layout
        (`stack_layers`): the training layout is scanned as it is, the per-layer one is stacked on the fly.
        The decode step does not scan: it would stack the whole cache every token.
        """
        cfg = self.config
        if scan and not self.is_initializing() and uses_one_layer_body(cfg):
            return self._scan_one_body(x, positions, masks, doc_pos, prefix, lengths, collect_hidden)
        if scan and not self.is_initializing() and layer_runs(cfg) is not None:
            return self._scan_layers(x, positions, masks, doc_pos, prefix, lengths, collect_hidden)
        layers = self.layers
        if not self.is_initializing() and is_stacked(self.variables["params"]):
            params = self._stacked_params()
            layers = [self._applied_layer(i, layer_params(params, cfg, i)) for i in range(cfg.num_layers)]
        states: list[LayerState] = []
        hidden: list[jax.Array] = []
        pass_kv: dict[int, KV] = {}
        for i, layer in enumerate(layers):
            producer = cfg.kv_producer(i)
            if collect_hidden:
                hidden.append(x)
            layer_prefix = None if prefix is None else LayerState(prefix[producer].kv, prefix[i].ssm)
            x, state = layer(x, positions, masks[cfg.is_global(i)], doc_pos, layer_prefix, pass_kv.get(producer),
                             lengths)
            if state.kv is not None:
                pass_kv[i] = state.kv
            states.append(state)
        return x, tuple(states), hidden

    def _applied_layer(self, i: int, params: dict) -> Callable:
        """Layer i as a function of the loop's arguments, on `params` (one layer's tree) given as data rather
        than found by the module's name (the training layout has no `layers_<i>` entries)."""
        apply = functools.partial(HymbaLayer(self.config, i, parent=None).apply, {"params": params})
        if self.config.remat in ("none", "auto"):
            return apply
        return jax.checkpoint(apply, policy=REMAT_POLICIES[self.config.remat], prevent_cse=True)

    def _stacked_params(self) -> dict:
        """The parameters (unboxed) in the training layout (`stack_layers`; the per-layer layout is stacked
        here), their shapes checked first: a wrong parameter is named as the layer itself would name it
        (stacking, or scanning, would fail without naming it)."""
        cfg = self.config
        params = nn.meta.unbox(self.variables["params"])
        flat = lambda tree: traverse_util.flatten_dict(tree)
        stacked = is_stacked(params)
        want, got = flat(param_shapes(cfg, stacked=stacked)), flat(params)
        for path, shape in want.items():
            if path in got and got[path].shape != shape.shape:
                raise ScopeParamShapeError(path[-1], "/".join(("",) + path[:-1]), got[path].shape, shape.shape)
        return params if stacked else stack_layers(params, cfg)

    def _scan_one_body(self, x, positions, masks, doc_pos, prefix, lengths, collect_hidden):
        """`run_layers` as one `lax.scan` over every layer, each layer's kind as data: whether it is global
        (`layer_kind_mask`: the attention backend takes the window at run time) and whether it owns its K/V
        (the latest owner's K/V ride in the carry; a consumer is given its producer's K/V projections, and
        the K/V it computes from them are dropped by a select, so their gradient is zero). XLA compiles one
        layer, forward and backward, instead of ten (the 1.5B's `layer_runs`); a consumer spends its
        discarded K/V projections (3% of a layer's projection FLOPs). (Choosing between layer bodies with
        `lax.switch` instead made the 1.5B step 13-15% slower and 12 GiB larger, docs/performance.md.)"""
        cfg = self.config
        layers = range(cfg.num_layers)
        stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
        per_layer = (gather_layers(self._stacked_params(), cfg, layers, with_kv=True),
                     jnp.array([cfg.is_global(i) for i in layers]),
                     jnp.array([cfg.owns_kv(i) for i in layers]),
                     None if prefix is None else stack([LayerState(prefix[cfg.kv_producer(i)].kv, prefix[i].ssm)
                                                        for i in layers]))
        policy = save_matmuls_and_kernels if cfg.remat in ("none", "auto") else REMAT_POLICIES[cfg.remat]
        layer = HymbaLayer(cfg, None, parent=None)

        def apply(layer_params, x, is_global, owns, layer_prefix, shared_kv):
            return layer.apply({"params": layer_params}, x, positions, layer_kind_mask(masks, is_global), doc_pos,
                               layer_prefix, shared_kv, lengths, owns_kv=owns)

        apply = jax.checkpoint(apply, policy=policy, prevent_cse=False)   # the scan keeps XLA from merging

        def step(carry, inputs):
            x, kv = carry
            new_x, state = apply(inputs[0], x, *inputs[1:], kv)
            kv = KV(*(a.astype(b.dtype) for a, b in zip(state.kv, kv)))
            return (new_x, kv), (state, x if collect_hidden else None)

        zeros = lambda width: jnp.zeros(x.shape[:2] + (cfg.num_kv_heads, width), x.dtype)
        (x, _), (states, ins) = jax.lax.scan(step, (x, KV(zeros(cfg.qk_head_dim), zeros(cfg.v_head_dim))),
                                             per_layer)
        take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        states = tuple(LayerState(take(states.kv, i) if cfg.owns_kv(i) else None, take(states.ssm, i))
                       for i in layers)
        return x, states, [ins[i] for i in layers] if collect_hidden else []

    def _scan_layers(self, x, positions, masks, doc_pos, prefix, lengths, collect_hidden):
        """`run_layers` with every run of identical units as one `lax.scan` over the stacked parameters
        (and prefix states) of its units; a run of one unit is called directly.

        Runs of the same unit kind share one step function (the 1.5B's two runs of [owner, consumer] pairs,
        its three single global layers): JAX caches tracing a scan body or checkpointed layer by the function
        and its input types, and linearizing and transposing it by the traced program, so each kind is traced
        and differentiated once per pass instead of once per run. A layer's index only selects its kind (KV
        owner or consumer, global or sliding window), so the first unit's layers stand for every unit.
        """
        cfg = self.config
        params = self._stacked_params()
        steps: dict[tuple, Callable] = {}
        states: list[Optional[LayerState]] = [None] * cfg.num_layers
        hidden: list[Optional[jax.Array]] = [None] * cfg.num_layers
        for run in layer_runs(cfg):
            scanned = len(run) > 1
            key = (unit_kind(cfg, run[0]), scanned)
            if key not in steps:
                steps[key] = self._unit_step(run[0], scanned, positions, masks, doc_pos, lengths, collect_hidden)
            unit_step = steps[key]

            prefixes = lambda u: None if prefix is None else tuple(prefix[i] for i in u)
            if not scanned:
                unit = run[0]
                x, (outs, ins) = unit_step(x, (tuple(layer_params(params, cfg, i) for i in unit), prefixes(unit)))
                per_unit = [(outs, ins)]
            else:
                # Each position of the unit: that layer of every unit of the run, stacked.
                unit_params = tuple(gather_layers(params, cfg, [u[j] for u in run], with_kv=cfg.owns_kv(run[0][j]))
                                    for j in range(len(run[0])))
                unit_prefix = jax.tree.map(lambda *a: jnp.stack(a), *[prefixes(u) for u in run])
                x, ys = jax.lax.scan(unit_step, x, (unit_params, unit_prefix))
                per_unit = [jax.tree.map(lambda a, k=k: a[k], ys) for k in range(len(run))]
            for u, (outs, ins) in zip(run, per_unit):
                for j, i in enumerate(u):
                    states[i] = outs[j]
                    if collect_hidden:
                        hidden[i] = ins[j]
        return x, tuple(states), hidden if collect_hidden else []

    def _unit_step(self, unit: tuple[int, ...], scanned: bool, positions, masks, doc_pos, lengths,
                   collect_hidden: bool) -> Callable:
        """The step of one unit, (x, (unit params, unit prefix states or None)) -> (x, (the unit's layer
        states, its layers' inputs or None)): the body of a run's scan, or the call of a run of one unit."""
        cfg = self.config
        policy = save_matmuls_and_kernels if cfg.remat in ("none", "auto") else REMAT_POLICIES[cfg.remat]
        layers = []
        for i in unit:
            apply = functools.partial(HymbaLayer(cfg, i, parent=None).apply, mask=masks[cfg.is_global(i)],
                                      positions=positions, doc_pos=doc_pos, lengths=lengths)
            # A scan already keeps XLA from merging the recomputation with the forward; alone, it must not.
            layers.append(jax.checkpoint(apply, policy=policy, prevent_cse=not scanned))

        def unit_step(x, unit_inputs):
            unit_params, unit_prefix = unit_inputs
            outs, ins, kv = [], [], None
            for j, apply in enumerate(layers):
                ins.append(x)
                layer_prefix = None if unit_prefix is None else LayerState(unit_prefix[0].kv, unit_prefix[j].ssm)
                x, state = apply({"params": unit_params[j]}, x, prefix=layer_prefix, shared_kv=kv)
                kv = kv if j else state.kv                 # the unit's first layer owns its K/V
                outs.append(state)
            return x, (tuple(outs), tuple(ins) if collect_hidden else None)

        return unit_step

    def logits(self, x: jax.Array) -> jax.Array:
        """Final-normed hidden states (..., d) -> logits (..., vocab) in fp32 (fp64 when computing in fp64) through the (tied) head."""
        head = self.embedding.T if self.config.tie_word_embeddings else self.lm_head
        return jnp.einsum("...d,dv->...v", x, head.astype(x.dtype), preferred_element_type=accum_dtype(x.dtype))

    @staticmethod
    def _with_meta(xm: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.concatenate([jnp.broadcast_to(xm, (x.shape[0],) + xm.shape[1:]), x], axis=1)


def uses_one_layer_body(config: HymbaConfig) -> bool:
    """Whether `run_layers(scan=True)` runs the whole stack as one scan whose body is any layer (its kind as
    data, `HymbaForCausalLM._scan_one_body`): `config.one_layer_body` is on, the stack has layers of more
    than one kind, the attention backend takes the window at run time (all but `STATIC_WINDOW_BACKENDS`: on
    GPUs and CPUs, not with splash on TPUs), and every KV consumer directly follows its group (`layer_runs`
    is not None: the latest owner's K/V are the ones the scan carries). Otherwise the runs of `layer_runs`
    are scanned, kind by kind."""
    cfg = config
    runs = layer_runs(cfg)
    return (cfg.one_layer_body and cfg.has_attention and runs is not None and len(runs) > 1
            and attention_backend(cfg.attention_backend, cfg.dtype) not in STATIC_WINDOW_BACKENDS)


def layer_runs(config: HymbaConfig) -> Optional[tuple[tuple[tuple[int, ...], ...], ...]]:
    """The layer stack as runs of identical units, for `run_layers(scan=True)`.

    A unit is a KV owner followed by the layers that reuse its K/V (a layer without consumers is a unit of
    one). Units are identical when their layers have the same kinds (global or sliding window, owner or
    consumer); consecutive identical units form a run, each unit a tuple of layer indices. The 1.5B model:
    [0] | 7 x [owner, consumer] | [15] | [16, 17, 18] | 6 x [owner, consumer] | [31], so XLA compiles 10
    layers instead of 32. None when a KV consumer does not directly follow its group's previous layer
    (`kv_reuse_groups` allows it, no released model does it): such a stack runs layer by layer.
    """
    cfg = config
    units: list[tuple[int, ...]] = []
    for i in range(cfg.num_layers):
        if not cfg.has_attention or cfg.owns_kv(i):
            units.append((i,))
        elif units and units[-1][0] == cfg.kv_producer(i) and units[-1][-1] == i - 1:
            units[-1] += (i,)
        else:
            return None
    runs: list[list[tuple[int, ...]]] = []
    for unit in units:
        if runs and unit_kind(cfg, runs[-1][0]) == unit_kind(cfg, unit):
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return tuple(tuple(run) for run in runs)


def unit_kind(config: HymbaConfig, unit: tuple[int, ...]) -> tuple[tuple[bool, bool], ...]:
    """What makes the units of `layer_runs` identical: (global, owns its K/V) of each of its layers (() without
    attention, where every layer is the same)."""
    return tuple((config.is_global(i), config.owns_kv(i)) for i in unit) if config.has_attention else ()


def _initialisers(config: HymbaConfig, length: int = 8):
    """The pieces `init_params` and `boxed_param_shapes` are built from: init_shared(key) -> the top-level
    parameters (embedding, meta tokens, final norm, LM head) and, per layer kind (KV consumer or not),
    (its layers, init_layer(key) -> one layer's parameters), both boxed with their logical axes. The kind
    that is not a consumer (KV owners, or every layer without KV sharing; layer 0 is one) has every
    parameter. The kernels do not change the parameters, so the initialisers run plain JAX ones: they are
    vmapped over layers, which cuDNN's attention does not support, and run on any platform."""
    cfg = config.replace(attention_backend="xla", scan_backend="associative")
    model = HymbaForCausalLM(cfg, parent=None)      # parent=None: also built inside a module's method
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.zeros((1, length, cfg.hidden_size), dtype)
    index = jnp.arange(length)[None]
    mask = attention_mask(index, index, window=None)
    kv = KV(jnp.zeros((1, length, cfg.num_kv_heads, cfg.qk_head_dim), dtype),
            jnp.zeros((1, length, cfg.num_kv_heads, cfg.v_head_dim), dtype))

    def init_shared(key):
        touch_all = lambda m, h: m.logits(m.final_norm(h))        # setup() makes the top-level parameters
        return model.init(key, x, method=touch_all)["params"]

    kinds: dict[bool, list[int]] = {}
    for i in range(cfg.num_layers):
        kinds.setdefault(cfg.has_attention and not cfg.owns_kv(i), []).append(i)
    layer_inits = {}
    for consumer, layers in kinds.items():
        layer = HymbaLayer(cfg, layers[0], parent=None)

        def init_layer(key, layer=layer, consumer=consumer):
            return layer.init(key, x, index, mask, None, None, kv if consumer else None)["params"]

        layer_inits[consumer] = (layers, init_layer)
    return init_shared, layer_inits


def init_params(config: HymbaConfig, rng: jax.Array, shardings: Optional[dict] = None,
                stacked: bool = False) -> dict:
    """Randomly initialised parameters (plain arrays, logical-axis boxes removed), in the per-layer layout
    or, with `stacked`, the training layout (`stack_layers`).

    Compiling the whole model's `init` means one RNG expansion per tensor of every layer (the 1.5B: 4,270
    fusions; XLA's GPU passes spent about 4 minutes on them on the H200 host, docs/performance.md). Every
    layer is instead made by one vmapped initialiser of a layer with every parameter (a KV owner's), from
    the layer's own key (`fold_in(rng, index)`), so XLA compiles one RNG expansion per tensor for all
    layers (a KV consumer's parameters are those without the K/V projections). The rest (embedding, meta
    tokens, final norm, LM head) is one more small program. Each parameter has the distribution
    `HymbaForCausalLM.init` gives it (the modules' own initialisers); the random streams differ.

    shardings: the parameter tree's NamedShardings (`param_shardings` with the same `stacked`): every array
    is created on its devices, so no device holds more than its shard. None: default placement.
    """
    init_shared, layer_inits = _initialisers(config)
    init_layer = layer_inits[False][1]
    shared_rng, layer_rng = jax.random.split(rng)
    split = lambda tree: ({k: v for k, v in tree.items() if not is_layer_entry(k)},
                          {k: v for k, v in tree.items() if is_layer_entry(k)})
    shared_shardings, layer_shardings = (None, None) if shardings is None else split(shardings)
    params = dict(jax.jit(lambda key: nn.meta.unbox(init_shared(key)), out_shardings=shared_shardings)(shared_rng))

    def make_layers(key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(config.num_layers))
        every = traverse_util.flatten_dict(nn.meta.unbox(jax.vmap(init_layer)(keys)))   # (num_layers, ...)
        every_layer = tuple(range(config.num_layers))
        layers = _training_layout(config, lambda path, indices: every[path] if indices == every_layer
                                  else jnp.take(every[path], jnp.asarray(indices), axis=0))
        return layers if stacked else unstack_layers(layers, config)

    params.update(jax.jit(make_layers, out_shardings=layer_shardings)(layer_rng))
    return params


# The training layout of the parameters (`stack_layers`): instead of one entry per layer (`layers_<i>`,
# the model's own and the Hugging Face layout's), STACKED holds the parameters every layer has, stacked on
# a leading layer axis, and STACKED_KV_OWNERS the ones only KV owners have (their K/V projections), stacked
# over `config.kv_owner_layers`. The scanned layer stack reads it as it is (no per-step stacking), and the
# optimizer updates a few dozen arrays instead of one per parameter of every layer: for the 1.5B, 25 arrays
# instead of 677, which XLA compiles and JAX traces several times faster (docs/performance.md).
STACKED = "layers"
STACKED_KV_OWNERS = "kv_owner_layers"


def is_stacked(params: Mapping) -> bool:
    """Whether a parameter tree is in the training layout (`stack_layers`)."""
    return STACKED in params


@functools.lru_cache(maxsize=16)
def owner_only_paths(config: HymbaConfig) -> frozenset[tuple[str, ...]]:
    """Paths inside a layer's tree that only KV owners have (their K/V projections); empty when every layer
    has the same parameters."""
    shapes = _per_layer_boxed_shapes(config)
    paths = [set(traverse_util.flatten_dict(shapes[f"layers_{i}"])) for i in range(config.num_layers)]
    return frozenset(set.union(*paths) - set.intersection(*paths))


def is_layer_entry(name: str) -> bool:
    """Whether a top-level key of a parameter tree holds layers (`layers_<i>`, or the training layout's
    STACKED / STACKED_KV_OWNERS) rather than the embedding, meta tokens, final norm or LM head."""
    return name in (STACKED, STACKED_KV_OWNERS) or name.startswith("layers_")


def _training_layout(config: HymbaConfig, leaf: Callable) -> dict:
    """The layer entries of the training layout: leaf(path, layer indices) gives one stacked parameter (its
    leading axis over those layers) for each path of a layer's tree; the owner-only paths are stacked over
    the KV owners, the others over every layer."""
    kv_only = owner_only_paths(config)
    paths = traverse_util.flatten_dict(_per_layer_boxed_shapes(config)[f"layers_{config.kv_owner_layers[0]}"])
    every_layer = tuple(range(config.num_layers))
    out = {STACKED: traverse_util.unflatten_dict({p: leaf(p, every_layer) for p in paths if p not in kv_only})}
    if kv_only:
        out[STACKED_KV_OWNERS] = traverse_util.unflatten_dict(
            {p: leaf(p, tuple(config.kv_owner_layers)) for p in paths if p in kv_only})
    return out


def stack_layers(params: Mapping, config: HymbaConfig, stack: Optional[Callable] = None) -> dict:
    """A per-layer parameter tree in the training layout (see STACKED). stack: how the leaves of one
    parameter, a list in layer order, become one leaf (default `jnp.stack`)."""
    stack = stack or jnp.stack
    layers = [traverse_util.flatten_dict(params[f"layers_{i}"]) for i in range(config.num_layers)]
    out = {k: v for k, v in params.items() if not is_layer_entry(k)}
    out.update(_training_layout(config, lambda path, indices: stack([layers[i][path] for i in indices])))
    return out


def unstack_layers(params: Mapping, config: HymbaConfig, take: Optional[Callable] = None) -> dict:
    """The training layout back in the per-layer layout. take(leaf, i): the i-th entry of a stacked leaf
    (default: indexing; inside `jax.jit` for sharded parameters)."""
    out = {k: v for k, v in params.items() if not is_layer_entry(k)}
    out.update({f"layers_{i}": layer_params(params, config, i, take) for i in range(config.num_layers)})
    return out


def layer_params(params: Mapping, config: HymbaConfig, i: int, take: Optional[Callable] = None) -> dict:
    """Layer i's own parameter tree (what `layers_<i>` holds) from a tree in either layout (take: as in
    `unstack_layers`)."""
    if not is_stacked(params):
        return params[f"layers_{i}"]
    take = take or (lambda a, index: a[index])
    flat = {p: take(a, i) for p, a in traverse_util.flatten_dict(params[STACKED]).items()}
    if STACKED_KV_OWNERS in params and config.owns_kv(i):
        slot = config.kv_owner_layers.index(i)
        flat.update({p: take(a, slot) for p, a in traverse_util.flatten_dict(params[STACKED_KV_OWNERS]).items()})
    return traverse_util.unflatten_dict(flat)


def gather_layers(params: Mapping, config: HymbaConfig, layers: Sequence[int], with_kv: bool) -> dict:
    """The parameters of `layers` from the training layout, stacked in that order (leading axis
    len(layers)). with_kv: also the owner-only parameters, each layer's KV producer's (a consumer's are its
    producer's, whose K/V it uses anyway; the one-body scan computes them and drops the result)."""
    layers = tuple(layers)

    def take(a, indices):
        if indices == tuple(range(a.shape[0])):
            return a
        step = indices[1] - indices[0] if len(indices) > 1 else 1
        if step > 0 and indices == tuple(range(indices[0], indices[-1] + 1, step)):
            return a[indices[0]:indices[-1] + 1:step]
        return jnp.take(a, jnp.asarray(indices), axis=0)

    flat = {p: take(a, layers) for p, a in traverse_util.flatten_dict(params[STACKED]).items()}
    if with_kv and STACKED_KV_OWNERS in params:
        slots = tuple(config.kv_owner_layers.index(config.kv_producer(i)) for i in layers)
        flat.update({p: take(a, slots) for p, a in traverse_util.flatten_dict(params[STACKED_KV_OWNERS]).items()})
    return traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=16)
def _per_layer_boxed_shapes(config: HymbaConfig) -> dict:
    """`boxed_param_shapes` per layer: traced once per layer kind."""
    init_shared, layer_inits = _initialisers(config)
    key = jax.random.key(0)
    params = dict(jax.eval_shape(init_shared, key))
    for layers, init_layer in layer_inits.values():
        shapes = jax.eval_shape(init_layer, key)
        params.update({f"layers_{i}": shapes for i in layers})
    return params


@functools.lru_cache(maxsize=32)
def boxed_param_shapes(config: HymbaConfig, stacked: bool = False) -> dict:
    """The parameter tree (per-layer, or with `stacked` the training layout) as ShapeDtypeStructs boxed with
    their logical axes (nn.Partitioned; a stacked parameter's layer axis is named None, never sharded),
    nothing allocated: what the sharding rules read. Traced once, not per layer (tracing the whole model's
    init took 5-8 s for the 1.5B, and start-up needed it several times), and cached per config: treat the
    result as read-only."""
    per_layer = _per_layer_boxed_shapes(config)
    if not stacked:
        return per_layer

    def stack(boxes):
        first = boxes[0]
        value = jax.ShapeDtypeStruct((len(boxes),) + first.value.shape, first.value.dtype)
        return first.replace(value=value, names=(None,) + tuple(first.names))

    return stack_layers(per_layer, config, stack)


def param_shapes(config: HymbaConfig, stacked: bool = False) -> dict:
    """The parameter tree (per-layer, or with `stacked` the training layout) as ShapeDtypeStructs, nothing
    allocated."""
    return nn.meta.unbox(boxed_param_shapes(config, stacked))


def param_shardings(config: HymbaConfig, mesh: Mesh, rules: AxisRules, stacked: bool = False) -> dict:
    """NamedShardings of the parameter tree (per-layer, or with `stacked` the training layout) on `mesh`,
    from the model's logical axes and `rules` (nothing allocated): what training, loading and export place
    each parameter by."""
    return logical_shardings(boxed_param_shapes(config, stacked), mesh, rules)
