"""The offline fine-tuning example: a tiny Hymba learns generated instruction tasks (addition, the larger of
two numbers, repeating two words; hymba_jax/data/tasks.py) with the loss on the answers only, on the CPU
with nothing to download or supply (600 steps: 35 min on 2 cores shared with other jobs, an estimated 8 min
on 2 idle cores; held-out accuracy 0% -> 41%, docs/finetuning.md):

    python train.py --config configs/tiny_sft.py --workdir /tmp/hymba-tiny-sft
    python benchmarks/sft_accuracy.py --workdir /tmp/hymba-tiny-sft      # held-out accuracy, before / after

The base model is random (the run's seed), not pretrained: the example shows the fine-tuning machinery
(chat template, masked loss, packing, checkpoints, evaluation) end to end in minutes, so its learning
rate is a from-scratch one, not configs/sft.py's fine-tune rate. The model is configs/tiny.py's; the
tokenizer is the default-corpus one (2048 pieces). The validation loss is the loss on the held-out
answers (and their end-of-turn tokens).
"""

from configs import tiny


def get_config():
    c = tiny.get_config()          # the same model and default-corpus tokenizer (2048 pieces)
    c.data.source = "tasks"
    c.data.format = "chat"
    c.data.task_examples = 20000
    c.data.val_fraction = 0.05
    c.batch_size = 16
    c.num_steps = 600
    c.optimizer.min_lr_ratio = 0.0
    c.log_every = 20
    c.eval_batches = 8
    c.checkpoint_every = 200
    return c
