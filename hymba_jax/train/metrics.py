"""What a person watches during training: progress bar, JSONL log, TensorBoard events, loss-curve PNG,
and the FLOPs model behind tokens/s and MFU.

FLOPs per trained token (forward + backward = 3 x forward, a matmul of m x n weights = 2mn per token):

    6 * N  +  6 * sum over layers of heads * (qk_head_dim + v_head_dim) * keys_seen

N counts every parameter (the tied embedding is the LM head's matmul). keys_seen is the mean number of
keys a query attends to in a full row of L tokens: M meta tokens plus (L + 1) / 2 causal keys in a global
layer, or the mean of min(t + 1, window + 1) in a sliding-window layer. The SSM scan (about 9 * d_inner *
d_state per token per layer) and norms are left out (under 1% at the paper's sizes). MFU = FLOPs per
token * tokens/s / (peak FLOP/s per device * devices), peak from the config or `PEAK_FLOPS` (dense bf16).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import param_shapes

# Dense bf16 peak FLOP/s per device, matched against jax's `device_kind` (first substring that matches).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"


def param_count(model_config: HymbaConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(model_config)))


def flops_per_token(model_config: HymbaConfig, seq_len: int) -> float:
    """Training FLOPs per token of a full row (formula in the module docstring)."""
    cfg = model_config
    flops = 6.0 * param_count(cfg)
    if cfg.has_attention:
        t = np.arange(seq_len)
        for layer in range(cfg.num_layers):
            window = cfg.attention_window(layer)
            causal = (seq_len + 1) / 2 if window is None else float(np.minimum(t + 1, window + 1).mean())
            keys = cfg.num_meta_tokens + causal
            flops += 6.0 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys
    return flops


def peak_flops_per_device(configured: float) -> Optional[float]:
    """The configured peak, else the device table's; None when unknown (e.g. CPU): MFU is then omitted."""
    if configured:
        return float(configured)
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


class MetricsLogger:
    """Writes metrics of process 0: `metrics.jsonl` (one JSON object per record, 'kind' = 'train', 'eval'
    or 'run': the kernels and settings each start or resume ran with), TensorBoard scalars under `tensorboard/` (no TensorFlow needed), and the progress bar.

    Resuming at `start_step` drops the records after it (they belong to the lost part of the run), so
    the log always reads as one uninterrupted run.
    """

    def __init__(self, workdir: str | Path, start_step: int, num_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / METRICS_FILE
        self.workdir = Path(workdir)
        self.bar = None
        if not self.enabled:
            return
        from tensorboard.summary import Writer  # imported here: only process 0 writes events

        self.kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.kept))
        self.file = self.path.open("a")
        self.writer = Writer(str(self.workdir / TENSORBOARD_DIR))
        self.bar = tqdm(total=num_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        plain = lambda v: v if v is None or isinstance(v, (str, bool)) else float(v)
        record = {"kind": kind, "step": step, "time": time.time(), **{k: plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in values.items():
            if value is not None and not isinstance(value, (str, bool)):
                self.writer.add_scalar(f"{kind}/{key}", float(value), step)
        self.writer.flush()
        if kind == "eval":
            self.bar.write(f"step {step}: validation loss {values['loss']:.4f} "
                           f"(perplexity {math.exp(min(values['loss'], 50)):.2f})")

    def record(self, kind: str, step: int) -> Optional[dict]:
        """The values of the `kind` record of `step` kept from before the resume (None if there is none, or
        on processes other than 0)."""
        found = [r for r in self.kept if r["kind"] == kind and r["step"] == step] if self.enabled else []
        return {k: v for k, v in found[-1].items() if k not in ("kind", "step", "time")} if found else None

    def progress(self, step: int, loss: Optional[float], tokens_per_s: float) -> None:
        """loss None: every step since the last update was skipped (not finite)."""
        if self.enabled:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                                 refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.file.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(workdir: str | Path) -> Path:
    """`loss_curve.png`: training loss per logged step and validation loss, from `metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(workdir) / METRICS_FILE)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["kind"] == kind]
        if points:
            ax.plot(*zip(*points), style, label={"train": "training loss", "eval": "validation loss"}[kind])
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(workdir) / LOSS_CURVE_FILE
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
