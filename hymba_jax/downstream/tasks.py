"""The paper's benchmark tasks in lm-evaluation-harness's formats (lm-eval 0.4).

Every task turns a document (a dict with the Hugging Face dataset's fields, so a local JSONL line and a
`datasets` row are interchangeable) into text requests exactly as the harness's task definition does:
the same prompt template, target delimiter " ", few-shot delimiter "\\n\\n", description and few-shot
sampler. Schemas (one JSON object per line):

  arc_easy, arc_challenge  {"question": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}
  piqa                     {"goal": str, "sol1": str, "sol2": str, "label": 0|1}
  hellaswag                {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": [str x4],
                            "label": int or "0".."3"}
  winogrande               {"sentence": str with one "_", "option1": str, "option2": str, "answer": "1"|"2"}
  mmlu                     {"question": str, "subject": str, "choices": [str x4], "answer": 0..3}
  squad_completion         {"text": str, "value": str}
  lambada_openai           {"text": str}

Few-shot pools: MMLU takes the first 5 documents of the same subject from its dev split ("first_n");
the other tasks sample with `random.Random(1234)` as the harness's default sampler does.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Literal, Optional, Sequence

OutputType = Literal["multiple_choice", "loglikelihood", "generate_until"]
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Request:
    """One model call: score `continuation` after `context`, or generate after `context` until a stop
    string of `until` (or `max_gen_toks` tokens)."""

    context: str
    continuation: str = ""
    until: tuple[str, ...] = ()
    max_gen_toks: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
    """A task definition: fields mirror the harness's YAML (doc_to_text / doc_to_choice / doc_to_target).

    For `partial` tasks (Winogrande) the choices are contexts and the target is the continuation scored
    after each of them ("partial evaluation").
    """

    name: str
    output_type: OutputType
    text: Callable[[dict], str]
    metrics: tuple[str, ...]
    choices: Optional[Callable[[dict], list[str]]] = None
    gold: Optional[Callable[[dict], int]] = None
    target: Optional[Callable[[dict], str]] = None
    process: Callable[[dict], dict] = lambda doc: doc
    description: Callable[[dict], str] = lambda doc: ""
    partial: bool = False
    num_fewshot: int = 0
    fewshot_sampler: Literal["random", "first_n"] = "random"
    fewshot_group: Optional[str] = None     # few-shot documents must share this field (MMLU: subject)
    until: tuple[str, ...] = ()
    max_gen_toks: int = 0
    hf_dataset: tuple[str, Optional[str]] = ("", None)
    eval_split: str = "validation"
    fewshot_split: Optional[str] = None

    def answer(self, doc: dict) -> str:
        """The text that follows a few-shot example's prompt."""
        if self.output_type == "multiple_choice" and not self.partial:
            return self.choices(doc)[self.gold(doc)]
        return self.target(doc)

    def prompt(self, doc: dict) -> str:
        """The doc's own prompt (for partial tasks: the context before the gold choice)."""
        return self.choices(doc)[self.gold(doc)] if self.partial else self.text(doc)

    def context(self, doc: dict, fewshot: Sequence[dict]) -> str:
        """Description, then each example as prompt + " " + answer + "\\n\\n", then this doc's prompt
        (partial tasks: without it; each choice is appended to this context)."""
        shots = "".join(self.prompt(d) + TARGET_DELIMITER + self.answer(d) + FEWSHOT_DELIMITER for d in fewshot)
        return self.description(doc) + shots + ("" if self.partial else self.text(doc))

    def requests(self, doc: dict, fewshot: Sequence[dict] = ()) -> list[Request]:
        ctx = self.context(doc, fewshot)
        if self.partial:
            return [Request(ctx + option, TARGET_DELIMITER + self.target(doc)) for option in self.choices(doc)]
        if self.output_type == "multiple_choice":
            return [Request(ctx, TARGET_DELIMITER + c) for c in self.choices(doc)]
        if self.output_type == "loglikelihood":
            return [Request(ctx, self.target(doc))]
        return [Request(ctx, until=self.until, max_gen_toks=self.max_gen_toks)]


# --------------------------------------------------------------------------------------------------
# Harness preprocessing, copied in meaning from lm_eval/tasks/*/utils.py


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of HellaSwag
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return dict(doc, query=hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                choices=[hellaswag_preprocess(e) for e in doc["endings"]], gold=int(doc["label"]))


def winogrande_choices(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def winogrande_target(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def mmlu_description(doc: dict) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(doc['subject'].split('_'))}.\n\n"


def mmlu_text(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _arc(name: str, hf_name: str) -> Task:
    return Task(name, "multiple_choice", text=lambda d: f"Question: {d['question']}\nAnswer:",
                choices=lambda d: list(d["choices"]["text"]),
                gold=lambda d: list(d["choices"]["label"]).index(d["answerKey"]),
                metrics=("acc", "acc_norm"), hf_dataset=("allenai/ai2_arc", hf_name), eval_split="test",
                fewshot_split="train")


BENCHMARK_TASKS: dict[str, Task] = {t.name: t for t in [
    _arc("arc_easy", "ARC-Easy"),
    _arc("arc_challenge", "ARC-Challenge"),
    Task("piqa", "multiple_choice", text=lambda d: f"Question: {d['goal']}\nAnswer:",
         choices=lambda d: [d["sol1"], d["sol2"]], gold=lambda d: int(d["label"]),
         metrics=("acc", "acc_norm"), hf_dataset=("baber/piqa", None), fewshot_split="train"),
    Task("hellaswag", "multiple_choice", text=lambda d: d["query"], choices=lambda d: d["choices"],
         gold=lambda d: d["gold"], process=hellaswag_process, metrics=("acc", "acc_norm"),
         hf_dataset=("Rowan/hellaswag", None), fewshot_split="train"),
    Task("winogrande", "multiple_choice", text=lambda d: "", choices=winogrande_choices,
         gold=lambda d: {"1": 0, "2": 1}[str(d["answer"])], target=winogrande_target, partial=True,
         metrics=("acc",), hf_dataset=("allenai/winogrande", "winogrande_xl"), fewshot_split="train"),
    Task("mmlu", "multiple_choice", text=mmlu_text, choices=lambda d: ["A", "B", "C", "D"],
         gold=lambda d: int(d["answer"]), description=mmlu_description, metrics=("acc",), num_fewshot=5,
         fewshot_sampler="first_n", fewshot_group="subject", hf_dataset=("cais/mmlu", "all"),
         eval_split="test", fewshot_split="dev"),
    Task("squad_completion", "generate_until", text=lambda d: d["text"].strip(),
         target=lambda d: d["value"].strip(), metrics=("contains",), num_fewshot=1, until=("\n",),
         max_gen_toks=48, hf_dataset=("hazyresearch/based-squad", "default")),
    Task("lambada_openai", "loglikelihood", text=lambda d: " ".join(d["text"].split(" ")[:-1]),
         target=lambda d: " " + d["text"].split(" ")[-1], metrics=("acc", "perplexity"),
         hf_dataset=("EleutherAI/lambada_openai", "default"), eval_split="test"),
]}
PAPER_SUITE = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "mmlu", "squad_completion",
               "lambada_openai")


def get_task(name: str) -> Task:
    try:
        return BENCHMARK_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(BENCHMARK_TASKS)}") from None


def fewshot_examples(task: Task, docs: Sequence[dict], pool: Sequence[dict], num_fewshot: int,
                     pool_is_eval_split: bool) -> list[list[dict]]:
    """The few-shot documents of each eval doc, in evaluation order, as the harness draws them.

    'first_n': the first n of the pool (of the doc's group), the doc itself excluded. 'random': one
    `random.Random(1234)` drawing, per eval doc in order, n documents from a separate few-shot split, or
    n + 1 from the eval split itself with the doc removed.
    """
    if num_fewshot == 0:
        return [[] for _ in docs]
    rnd = random.Random(FEWSHOT_SEED)
    out = []
    for doc in docs:
        if task.fewshot_sampler == "first_n":
            group = [d for d in pool if task.fewshot_group is None
                     or d[task.fewshot_group] == doc[task.fewshot_group]]
            shots = [d for d in group if d != doc][:num_fewshot]
        else:
            extra = int(pool_is_eval_split)
            shots = [d for d in rnd.sample(list(pool), num_fewshot + extra) if d != doc][:num_fewshot]
        if len(shots) < num_fewshot:
            raise ValueError(f"{task.name}: {num_fewshot}-shot needs {num_fewshot} few-shot documents"
                             + (f" with {task.fewshot_group}={doc[task.fewshot_group]!r}" if task.fewshot_group else "")
                             + f", the pool has {len(shots)}")
        out.append(shots)
    return out
