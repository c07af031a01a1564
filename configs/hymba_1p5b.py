"""Hymba-1.5B with the paper's recipe: 2k-token sequences and a warmup-stable-decay schedule.

Model: `hymba_jax.config.hymba_1p5b`. The tokenizer is data.tokenizer: point it at Llama-2's tokenizer.model
(as the paper) for a 32001-token vocabulary; the default trains a SentencePiece model on the offline corpus.
The defaults make a run of 210B tokens (num_steps x batch_size x seq_len); see
`hymba_jax.train.config.paper_recipe`.

Kernels and remat are chosen where it runs (no flags needed): `auto` scan and attention backends, and
`remat="auto"`: no rematerialisation when the compiled step fits the device, else full remat. Measured
(docs/performance.md, 2026-12-03): one H200 at 8 x 2048, none 22.8k tokens/s (4096 x 4: 21.5k), first step
36-44 s after launch (full remat, measured 2026-12-02 with the cuDNN attention of before: 17.4k with
51.2 GiB); TPU v5p (95 GiB) at 8 x 2048 per chip, full needs 22.1 GiB with splash attention (v5p:2x2x1,
`python -m hymba_jax.aot`), none did not fit with XLA attention (169 GB of temporaries) and has not been
compiled with splash.
"""

from hymba_jax.train.config import paper_recipe


def get_config():
    return paper_recipe("hymba_1p5b", remat="auto", batch_size=512, num_steps=200000, learning_rate=1e-3)
