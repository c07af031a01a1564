"""Hymba-125M with the paper's recipe: 2k-token sequences and a warmup-stable-decay schedule.

Model: the paper's 125M shape (`hymba_jax.config.hymba_125m`). The tokenizer is data.tokenizer: point it at
Llama-2's tokenizer.model (as the paper) for a 32001-token vocabulary; the default trains a SentencePiece
model on the offline corpus. Batch, learning rate and step count are our defaults for a run of
26B tokens (num_steps x batch_size x seq_len), not numbers from the paper; scale num_steps to your
token budget (the WSD decay is always the last decay_fraction of the steps).
"""

from hymba_jax.train.config import base_config, model_config_dict


def get_config():
    c = base_config()
    c.model = model_config_dict("hymba_125m", dtype="bfloat16", param_dtype="float32", remat="none")
    c.seq_len = 2048
    c.batch_size = 256
    c.grad_accum_steps = 1
    c.num_steps = 50000
    c.optimizer.schedule = "wsd"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 2000
    c.optimizer.decay_fraction = 0.2
    c.optimizer.min_lr_ratio = 0.01
    c.optimizer.weight_decay = 0.1
    c.z_loss = 1e-4
    c.log_every = 20
    c.eval_every = 1000
    c.eval_batches = 50
    c.checkpoint_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
