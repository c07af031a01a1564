"""Supervised fine-tuning (instruction tuning) of a released checkpoint on your conversations: the loss is on
assistant tokens only, the conversations rendered by the checkpoint's chat template (docs/finetuning.md).

    python train.py --config configs/sft.py --workdir /tmp/hymba-sft \
        --config.init_from_hf=Hymba-1.5B-Base \
        --config.data.tokenizer=Hymba-1.5B-Base/tokenizer.model \
        --config.data.files='("chats.jsonl",)'

`data.files` holds .jsonl conversation records (schema in hymba_jax/data/chat.py); the chat template is the
`chat_template` of the tokenizer_config.json beside `data.tokenizer` when it has one, else the documented
default (`data.chat_template` picks another). The shape of the model comes from the checkpoint; the
preset below only describes the released 1.5B for validating the config without one.

Fine-tune defaults (ours, not published numbers): a small peak learning rate (1e-5), a short warmup (3% of
the steps), cosine decay to zero, no weight decay, 64 packed rows of 2048 tokens per step (about 130k
tokens, of which the responses carry the loss), 1000 steps. Scale num_steps to about 2-3 epochs of your
data; `eval_every` reports the loss on the held-out conversations' responses.
"""

from hymba_jax.train.config import base_config, model_config_dict


def get_config():
    c = base_config()
    c.model = model_config_dict("hymba_1p5b", dtype="bfloat16", param_dtype="float32", remat="auto")
    c.data.source = "files"
    c.data.format = "chat"
    c.data.files = ("chats.jsonl",)
    c.data.val_fraction = 0.02
    c.seq_len = 2048
    c.batch_size = 64
    c.num_steps = 1000
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 30
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = -1
    c.checkpoint_every = 200
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
