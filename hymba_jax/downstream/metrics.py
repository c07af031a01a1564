"""Per-document metrics and their aggregation, as lm-evaluation-harness defines them."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc: the highest log-likelihood is the gold choice. acc_norm: the same after dividing each
    log-likelihood by its choice's length in characters (without the leading space), as lm-eval does.
    Ties go to the first choice (np.argmax)."""
    lls = np.asarray(lls, np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / lengths) == gold)}


def contains(prediction: str, labels: Sequence[str]) -> float:
    """1 if any label occurs in the prediction, case-insensitively (squad_completion's metric)."""
    return float(max(bool(re.search(re.escape(label), prediction, re.IGNORECASE)) for label in labels))


def aggregate(metric: str, values: Sequence[float]) -> float:
    """mean for accuracies; perplexity = exp(-mean log-likelihood) over documents."""
    if not values:
        raise ValueError(f"no values to aggregate for {metric}")
    mean = float(np.mean(values))
    return math.exp(-mean) if metric == "perplexity" else mean


def stderr(metric: str, values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample std / sqrt n), for mean metrics; None for perplexity."""
    if metric == "perplexity" or len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))
