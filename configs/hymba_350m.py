"""Hymba-350M with the paper's recipe: 2k-token sequences and a warmup-stable-decay schedule.

Model: `hymba_jax.config.hymba_350m`. The tokenizer is data.tokenizer: point it at Llama-2's tokenizer.model
(as the paper) for a 32001-token vocabulary; the default trains a SentencePiece model on the offline corpus.
The defaults make a run of 52B tokens (num_steps x batch_size x seq_len); see
`hymba_jax.train.config.paper_recipe`.
"""

from hymba_jax.train.config import paper_recipe


def get_config():
    return paper_recipe("hymba_350m", remat="dots", batch_size=256, num_steps=100000, learning_rate=2e-3)
