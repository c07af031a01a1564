"""Hymba-1.5B with the paper's recipe: 2k-token sequences and a warmup-stable-decay schedule.

Model: `hymba_jax.config.hymba_1p5b`. The tokenizer is data.tokenizer: point it at Llama-2's tokenizer.model
(as the paper) for a 32001-token vocabulary; the default trains a SentencePiece model on the offline corpus.
The defaults make a run of 210B tokens (num_steps x batch_size x seq_len); see
`hymba_jax.train.config.paper_recipe`.
"""

from hymba_jax.train.config import paper_recipe


def get_config():
    return paper_recipe("hymba_1p5b", remat="auto", batch_size=512, num_steps=200000, learning_rate=1e-3)
