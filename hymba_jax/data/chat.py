"""Conversations for supervised fine-tuning: the JSONL schema, the chat template, the loss mask, truncation.

Record schema (one JSON object per non-blank line of a `.jsonl` file):

    {"messages": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}                      # = one user and one assistant message
    {"system": "...", "prompt": "...", "response": "..."}     # with a system message

Roles are 'system', 'user' and 'assistant'; every content is a string; at least one assistant message,
the last message is an assistant's and no assistant content is empty or whitespace. A record that breaks
a rule raises `ChatRecordError` naming the file and line.

Rendering: a Jinja chat template (the Hugging Face convention: `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`) turns messages into text. The conversation is rendered one message at a time
and cut into spans: the text each message adds, and before an assistant message the generation prompt
(its header), which belongs to the prompt. Each span is tokenized on its own (`Tokenizer.encode_exact`;
the strings of the bos and eos pieces become their ids) and the ids concatenated, so:

* the loss mask is exact: a token is a target with weight 1 iff it belongs to an assistant span (the
  reply and what the template puts after it, e.g. the end-of-turn eos), never across a span boundary;
* the prompt that generation renders (`prompt_ids`, with the generation prompt) is token for token the
  prefix the model was trained on.

The template must be incremental (rendering the first k messages gives a prefix of rendering k + 1, and
the generation prompt extends the first k); templates that are not raise a ValueError naming them.

Truncation rule: a conversation of T tokens gives T - 1 next-token pairs, which must fit a row of
`seq_len`. A longer one keeps its longest prefix that ends with an assistant turn and fits (the later
turns are dropped, the rest is trained on unchanged); if even the first assistant turn does not fit, the
record raises `ChatRecordError` naming its file and line (raise seq_len or shorten the record).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import jinja2
import jinja2.sandbox
import ml_collections
import numpy as np

from hymba_jax.data import records
from hymba_jax.data.local_files import decoded_lines, expand_patterns
from hymba_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# The packed features of a fine-tuning example: weights (1 on assistant targets) are packed with the ids.
FEATURES = ("inputs", "targets", "weights")

# The default template (when neither data.chat_template nor the tokenizer's directory gives one):
#   <s><|system|>\n{system}</s><|user|>\n{prompt}</s><|assistant|>\n{response}</s>
# Every turn ends with eos; an assistant turn's eos is its last target, so generation stops there.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatRecordError(ValueError):
    """A conversation record that breaks the schema or the truncation rule (the message names file:line)."""


def parse_record(record: object, where: str) -> list[dict[str, str]]:
    """The messages [{'role', 'content'}, ...] of one JSON record (see the module docstring).

    `where` ('file:line') starts every error message.
    """
    if not isinstance(record, dict):
        raise ChatRecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if ("messages" in record) == ("prompt" in record or "response" in record):
        raise ChatRecordError(f"{where}: expected either a 'messages' list or 'prompt' and 'response' strings, "
                              f"got keys {sorted(record)}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatRecordError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    else:
        for key in ("prompt", "response", *(("system",) if "system" in record else ())):
            if not isinstance(record.get(key), str):
                raise ChatRecordError(f"{where}: {key!r} must be a string")
        messages = ([{"role": "system", "content": record["system"]}] if "system" in record else []) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatRecordError(f"{where}: message {i} must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise ChatRecordError(f"{where}: message {i} has unknown role {message.get('role')!r}; "
                                  f"expected one of {ROLES}")
        if message["role"] == "system" and i > 0:
            raise ChatRecordError(f"{where}: message {i}: a 'system' message may only come first")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ChatRecordError(f"{where}: message {i}: empty response (assistant content is blank)")
    if messages[-1]["role"] != "assistant":
        raise ChatRecordError(f"{where}: the last message is a {messages[-1]['role']!r} message; a conversation "
                              "must end with an assistant message (the loss is on assistant messages only)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: Path) -> Iterator[str]:
    """The records of one `.jsonl` file as prepared-corpus documents: JSON strings
    {"messages": [...], "source": "path:line"}, each record checked by `parse_record`."""
    for line_number, line in enumerate(decoded_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ChatRecordError(f"{where}: not a JSON object ({error.msg})") from None
        yield json.dumps({"messages": parse_record(record, where), "source": where})


def prepare_chat_files(patterns: Sequence[str], cache_dir: Path, val_fraction: float) -> Path:
    """The prepared corpus of the conversation records in the `.jsonl` files of `patterns`, built on first use.

    The train/validation split hashes each record's messages (not its file and line), as the text corpora do.
    """
    paths = expand_patterns(patterns)
    for path in paths:
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: data.format='chat' reads .jsonl conversation records, not {path.suffix!r}")
    key = records.fingerprint([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths], "chat-v1",
                              val_fraction)

    def documents() -> Iterator[str]:
        for path in paths:
            yield from read_jsonl(path)

    return records.ensure_prepared(cache_dir / "corpora" / f"chat-{key}", documents, val_fraction,
                                   split_text=messages_text)


def messages_text(document: str) -> str:
    """The part of a prepared record that decides its split: its messages."""
    return json.dumps(json.loads(document)["messages"])


class ChatTemplate:
    """A Jinja chat template with the tokenizer's bos and eos strings; picklable (Grain workers).

    `origin` says where the template came from, for error messages.
    """

    def __init__(self, source: str, origin: str, bos_token: str, eos_token: str):
        self.source, self.origin, self.bos_token, self.eos_token = source, origin, bos_token, eos_token
        # As transformers' apply_chat_template: a sandbox, blocks trimmed, `raise_exception` available.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"chat template from {origin}: line {error.lineno}: {error.message}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The text of `messages`; with `add_generation_prompt`, followed by the assistant's header."""
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def spans(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
        """(text, is_assistant) spans whose concatenation is `render(messages)`: for each message the text it
        adds, an assistant message's header (the generation prompt) as a separate prompt span."""
        spans, rendered = [], ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                rendered = self._extend(spans, rendered, self.render(messages[:i], True), False, i)
            rendered = self._extend(spans, rendered, self.render(messages[: i + 1]), message["role"] == "assistant", i)
        return spans

    def _extend(self, spans: list, rendered: str, longer: str, is_assistant: bool, i: int) -> str:
        if not longer.startswith(rendered):
            raise ValueError(f"chat template from {self.origin} is not incremental: rendering message {i} changes "
                             "the text of the messages before it, so prompt and response tokens cannot be told "
                             "apart; use a template that renders each message independently (data.chat_template)")
        if len(longer) > len(rendered):
            spans.append((longer[len(rendered):], is_assistant))
        return longer

    def __getstate__(self):
        return self.source, self.origin, self.bos_token, self.eos_token

    def __setstate__(self, state):
        self.__init__(*state)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def encode_span(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of one span: the bos and eos piece strings (e.g. '<s>', '</s>') become their ids, the rest
    `encode_exact`. A literal '</s>' in a message thus ends the turn, as in transformers."""
    specials = {tokenizer.piece(tokenizer.bos_id): tokenizer.bos_id, tokenizer.piece(tokenizer.eos_id): tokenizer.eos_id}
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode_exact(part))
    return ids


def tokenize(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[dict]
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(ids int32 (T,), is_assistant bool (T,), ends): the conversation's tokens, which of them belong to
    assistant spans, and the token index where each assistant turn ends (exclusive), for truncation."""
    ids: list[int] = []
    mask: list[bool] = []
    ends: list[int] = []
    for text, is_assistant in template.spans(messages):
        span = encode_span(tokenizer, text)
        ids.extend(span)
        mask.extend([is_assistant] * len(span))
        if is_assistant:
            ends.append(len(ids))
    return np.asarray(ids, np.int32), np.asarray(mask, bool), ends


def prompt_ids(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[dict]) -> list[int]:
    """The ids generation continues: `messages` (ending with a user message) and the generation prompt,
    tokenized span by span exactly as in training."""
    spans = template.spans(messages)
    rendered = "".join(text for text, _ in spans)
    full = template.render(messages, add_generation_prompt=True)
    if not full.startswith(rendered):
        raise ValueError(f"chat template from {template.origin} is not incremental (the generation prompt "
                         "changes the text before it)")
    spans.append((full[len(rendered):], False))
    return [i for text, _ in spans for i in encode_span(tokenizer, text)]


@dataclasses.dataclass(frozen=True)
class ConversationToExample(grain.transforms.Map):
    """A prepared record (JSON string) -> {'inputs', 'targets': int32 (n,), 'weights': float32 (n,)}, n <= seq_len.

    inputs drop the last token, targets the first; weights are 1 where the target is an assistant token.
    Longer conversations are truncated by the module's rule, or raise ChatRecordError naming file:line.
    """

    tokenizer: Tokenizer
    template: ChatTemplate
    seq_len: int

    def map(self, document: str) -> dict[str, np.ndarray]:
        record = json.loads(document)
        ids, mask, ends = tokenize(self.tokenizer, self.template, record["messages"])
        if len(ids) - 1 > self.seq_len:
            fitting = [end for end in ends if end - 1 <= self.seq_len]
            if not fitting:
                raise ChatRecordError(
                    f"{record['source']}: the first assistant turn ends at token {ends[0]}, beyond a row of "
                    f"seq_len={self.seq_len} + 1 tokens, so no whole turn fits (truncation keeps whole turns): "
                    "raise seq_len or shorten the record")
            ids, mask = ids[: fitting[-1]], mask[: fitting[-1]]
        return {"inputs": ids[:-1], "targets": ids[1:], "weights": mask[1:].astype(np.float32)}


def load_template(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template of `config.data` (data.chat_template):

    * '' : the `chat_template` of the tokenizer_config.json beside `data.tokenizer` (a checkpoint
      directory's), when there is one; else DEFAULT_CHAT_TEMPLATE;
    * 'default': DEFAULT_CHAT_TEMPLATE;
    * a path: a directory holding tokenizer_config.json, such a .json file, or a .jinja template file.
    """
    bos, eos = tokenizer.piece(tokenizer.bos_id), tokenizer.piece(tokenizer.eos_id)
    choice = config.chat_template
    if choice == "default":
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, "the default template", bos, eos)
    if not choice:
        beside = Path(config.tokenizer).expanduser().parent / "tokenizer_config.json" if config.tokenizer else None
        if beside is None or not beside.is_file() or "chat_template" not in json.loads(beside.read_text()):
            return ChatTemplate(DEFAULT_CHAT_TEMPLATE, "the default template", bos, eos)
        choice = str(beside)
    return ChatTemplate(read_template(choice), choice, bos, eos)


def read_template(path: str) -> str:
    """The template text of a directory with tokenizer_config.json, a tokenizer_config.json, or a .jinja file."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"chat template {path!r} (data.chat_template or --chat_template): no such file; "
                                "give a .jinja file, a tokenizer_config.json (or its directory) or 'default' "
                                "(docs/finetuning.md)")
    if file.suffix != ".json":
        return file.read_text()
    template = json.loads(file.read_text()).get("chat_template")
    if isinstance(template, list):   # transformers' named templates: [{'name': ..., 'template': ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not isinstance(template, str):
        raise ValueError(f"{file}: no 'chat_template' string (or named 'default' template); set "
                         "data.chat_template='default' or give a .jinja file")
    return template
