"""A tiny hybrid Hymba trained on the offline default corpus (stdlib docstrings) in a few minutes on a
2-core CPU: every feature is on (meta tokens, sliding-window + global layers, KV sharing, SSM heads).

    python train.py --config configs/tiny.py --workdir /tmp/hymba-tiny
"""

from hymba_jax.train.config import base_config, model_config_dict


def get_config():
    c = base_config()
    c.model = model_config_dict(
        "hymba_tiny",
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, qk_head_dim=32, v_head_dim=64,
        d_inner=256, intermediate_size=384, d_state=8, dt_rank=8, num_meta_tokens=8, sliding_window=64,
        global_layers=(0, 3), kv_reuse_groups=((1, 2),), rope_type="default",
        max_position_embeddings=1024, dtype="float32", param_dtype="float32",
    )
    c.data.vocab_size = 2048
    c.seq_len = 128
    c.batch_size = 8
    c.num_steps = 400
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.1
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = -1
    c.checkpoint_every = 100
    return c
