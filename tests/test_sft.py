"""Supervised fine-tuning data (hymba_jax/data/chat.py): the loss mask is exactly the assistant tokens, packed
examples give the loss they give alone, the template round-trips through an export, bad records name
their file and line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hymba_jax.config import hymba_tiny
from hymba_jax.data import Tokenizer, default_data_config, make_dataset
from hymba_jax.data import chat
from hymba_jax.data.config import DataConfigError, validate_data_config
from hymba_jax.model.lm import HymbaForCausalLM
from hymba_jax.train.step import loss_sums
from train_testing import REPO, SMALL_MODEL, write_small_corpus
from conftest import random_params

CONVERSATIONS = [
    {"prompt": "What is the value of x?", "response": "It is 42."},
    {"system": "Be brief.", "prompt": "Name a colour.", "response": "Blue"},
    {"messages": [{"role": "system", "content": "You help."},
                  {"role": "user", "content": "Define a list."},
                  {"role": "assistant", "content": "A sequence of items."},
                  {"role": "user", "content": "And a tuple?"},
                  {"role": "assistant", "content": " An immutable sequence.\n"}]},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Tokenizer]:
    directory = tmp_path_factory.mktemp("sft")
    _, model = write_small_corpus(directory)
    return directory, Tokenizer.from_file(model)


def template(tokenizer: Tokenizer, source: str = chat.DEFAULT_CHAT_TEMPLATE) -> chat.ChatTemplate:
    return chat.ChatTemplate(source, "test", tokenizer.piece(tokenizer.bos_id), tokenizer.piece(tokenizer.eos_id))


def expected_default(tokenizer: Tokenizer, messages) -> tuple[list[int], list[bool]]:
    """The default template's ids and assistant mask, written out by hand."""
    ids, mask = [tokenizer.bos_id], [False]
    for m in messages:
        header = tokenizer.encode_exact(f"<|{m['role']}|>\n")
        ids += header
        mask += [False] * len(header)
        if m["role"] == "assistant":
            body = tokenizer.encode_exact(m["content"]) + [tokenizer.eos_id]
            mask += [True] * len(body)
        else:
            body = tokenizer.encode_exact(m["content"]) + [tokenizer.eos_id]
            mask += [False] * len(body)
        ids += body
    return ids, mask


def test_mask_is_exactly_the_assistant_tokens(files):
    _, tokenizer = files
    tmpl = template(tokenizer)
    for record in CONVERSATIONS:
        messages = chat.parse_record(record, "test:1")
        ids, mask, ends = chat.tokenize(tokenizer, tmpl, messages)
        want_ids, want_mask = expected_default(tokenizer, messages)
        assert ids.tolist() == want_ids
        assert mask.tolist() == want_mask          # token by token
        # Each maximal run of assistant tokens decodes to one reply and ends with the end-of-turn eos.
        runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask.astype(int))) + 1)
        replies = [ids[r] for r in runs if mask[r[0]]]
        # (SentencePiece's decode drops one leading space: the dummy prefix it expects.)
        assert [tokenizer.decode(r[:-1]) for r in replies] == [
            m["content"].removeprefix(" ") for m in messages if m["role"] == "assistant"]
        assert all(r[-1] == tokenizer.eos_id for r in replies)
        assert ends == [r[-1] + 1 for r in runs if mask[r[0]]]
        example = chat.ConversationToExample(tokenizer, tmpl, 256).map(json.dumps({"messages": messages, "source": "t"}))
        np.testing.assert_array_equal(example["targets"], ids[1:])
        np.testing.assert_array_equal(example["weights"], mask[1:].astype(np.float32))


def test_mask_with_a_checkpoint_style_template(files):
    """A template in the released style (text markers, a system block, trailing newlines after each turn)."""
    _, tokenizer = files
    source = ("{% for m in messages %}{% if m['role'] == 'system' %}<extra_id_0>System\n{{ m['content'] }}\n\n"
              "{% elif m['role'] == 'user' %}<extra_id_1>User\n{{ m['content'] }}\n"
              "{% else %}<extra_id_1>Assistant\n{{ m['content'] }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}")
    tmpl = template(tokenizer, source)
    messages = chat.parse_record(CONVERSATIONS[2], "test:1")
    ids, mask, _ = chat.tokenize(tokenizer, tmpl, messages)
    want_ids, want_mask = [], []
    for text, is_assistant in [("<extra_id_0>System\nYou help.\n\n<extra_id_1>User\nDefine a list.\n", False),
                               ("<extra_id_1>Assistant\n", False), ("A sequence of items.\n", True),
                               ("<extra_id_1>User\nAnd a tuple?\n", False), ("<extra_id_1>Assistant\n", False),
                               (" An immutable sequence.\n\n", True)]:
        span = tokenizer.encode_exact(text)
        want_ids += span
        want_mask += [is_assistant] * len(span)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_template_round_trips(files, tmp_path):
    """spans -> text is the render; ids decode to it; the generation prompt is the trained prefix; an export
    carries the template and loading it back gives the same ids."""
    from hymba_jax.hf import save_hf_checkpoint

    directory, tokenizer = files
    tmpl = template(tokenizer)
    messages = chat.parse_record(CONVERSATIONS[2], "test:1")
    text = tmpl.render(messages)
    assert "".join(t for t, _ in tmpl.spans(messages)) == text
    ids, mask, _ = chat.tokenize(tokenizer, tmpl, messages)
    assert tokenizer.decode(ids) == text.replace("<s>", "").replace("</s>", "")
    prompt = chat.prompt_ids(tokenizer, tmpl, messages[:-1])
    assert ids[:len(prompt)].tolist() == prompt and mask[len(prompt):].all() and not mask[len(prompt) - 1]

    config = hymba_tiny(**SMALL_MODEL, vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="chat_template is written into tokenizer_config.json; pass the tokenizer"):
        save_hf_checkpoint(tmp_path / "export", config, random_params(config), chat_template="x")
    save_hf_checkpoint(tmp_path / "export", config, random_params(config), tokenizer=directory / "spm.model",
                       chat_template=chat.DEFAULT_CHAT_TEMPLATE)
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["chat_template"] == \
        chat.DEFAULT_CHAT_TEMPLATE
    data = default_data_config()
    data.tokenizer = str(tmp_path / "export" / "tokenizer.model")   # '' template: the one beside the tokenizer
    loaded = chat.load_template(data, Tokenizer.from_file(data.tokenizer))
    assert loaded.origin.endswith("tokenizer_config.json")
    assert chat.tokenize(tokenizer, loaded, messages)[0].tolist() == ids.tolist()
    data.chat_template = str(tmp_path / "export")
    assert chat.load_template(data, tokenizer).source == chat.DEFAULT_CHAT_TEMPLATE


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _sft_config(directory: Path, chats: Path, **overrides):
    config = default_data_config()
    config.update(dict(source="files", format="chat", files=(str(chats),), tokenizer=str(directory / "spm.model"),
                       cache_dir=str(directory / "cache"), val_fraction=0.3, packing_bins=4), **overrides)
    return config


def test_packed_batches_give_each_example_its_loss_alone(files, tmp_path):
    directory, tokenizer = files
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta list tuple value colour name".split()
    records = [{"prompt": " ".join(rng.choice(words, rng.integers(1, 8))),
                "response": " ".join(rng.choice(words, rng.integers(1, 6)))} for _ in range(30)]
    config = _sft_config(directory, _write(tmp_path / "chats.jsonl", records))
    seq_len = 128
    batches = list(make_dataset(config, tokenizer, split="train", global_batch_size=4, seq_len=seq_len,
                                shuffle=False, num_epochs=1))
    model_cfg = hymba_tiny(**SMALL_MODEL, vocab_size=tokenizer.vocab_size)
    model, params = HymbaForCausalLM(model_cfg), random_params(model_cfg, scale=0.3)
    sums = jax.jit(lambda batch: loss_sums(model, params, batch)[0])

    packed = {}
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            for segment in range(1, batch["segment_ids"][row].max() + 1):
                keep = batch["segment_ids"] == segment
                keep[np.arange(len(keep)) != row] = False
                weights = batch["weights"] * keep
                key = tuple(batch["inputs"][keep])
                packed[key] = float(sums({**batch, "weights": weights})) / weights.sum()
    assert max(b["segment_ids"].max() for b in batches) >= 3   # rows hold several examples

    examples = chat.ConversationToExample(tokenizer, chat.load_template(config, tokenizer), seq_len)
    from hymba_jax.data.sources import open_documents
    documents = list(open_documents(config, "train"))
    assert len(packed) == len(documents)
    for document in documents:
        example = examples.map(document)
        n = len(example["inputs"])
        alone = {k: np.zeros((1, seq_len), np.float32 if k == "weights" else np.int32)
                 for k in ("inputs", "targets", "segment_ids", "weights")}
        alone["inputs"][0, :n], alone["targets"][0, :n], alone["weights"][0, :n] = (
            example["inputs"], example["targets"], example["weights"])
        alone["segment_ids"][0, :n] = 1
        want = float(sums(alone)) / example["weights"].sum()
        np.testing.assert_allclose(packed[tuple(example["inputs"])], want, rtol=2e-5)


def test_truncation_keeps_whole_turns(files):
    _, tokenizer = files
    tmpl = template(tokenizer)
    messages = chat.parse_record(CONVERSATIONS[2], "chats.jsonl:7")
    ids, mask, ends = chat.tokenize(tokenizer, tmpl, messages)
    document = json.dumps({"messages": messages, "source": "chats.jsonl:7"})
    example = chat.ConversationToExample(tokenizer, tmpl, len(ids) - 2).map(document)   # one token short
    np.testing.assert_array_equal(example["targets"], ids[1:ends[0]])                 # the first turn only
    np.testing.assert_array_equal(example["weights"], mask[1:ends[0]])
    with pytest.raises(chat.ChatRecordError, match=r"chats.jsonl:7: the first assistant turn ends at token"):
        chat.ConversationToExample(tokenizer, tmpl, ends[0] - 2).map(document)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"message 0 has unknown role 'bot'"),
    ('{"prompt": "Hi", "response": "  "}', r"message 1: empty response"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"the last message is a .user. message; a conversation must end with an assistant"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', r"message 1: a 'system' message may only come first"),
    ('{"text": "plain"}', r"expected either a 'messages' list or 'prompt' and 'response'"),
    ('{"prompt": "a", "response": 3}', r"'response' must be a string"),
    ('{"prompt": "a", ', r"not a JSON object"),
])
def test_bad_records_name_file_and_line(files, tmp_path, line, message):
    directory, tokenizer = files
    chats = _write(tmp_path / "bad.jsonl", [CONVERSATIONS[0], "", line])
    with pytest.raises(chat.ChatRecordError, match=rf"{tmp_path / 'bad.jsonl'}:3: {message}"):
        make_dataset(_sft_config(directory, chats), tokenizer, split="train", global_batch_size=1, seq_len=64)


def test_a_too_long_record_names_file_and_line_when_read(files, tmp_path):
    directory, tokenizer = files
    chats = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "response": "ok"}] * 3)
    batches = make_dataset(_sft_config(directory, chats, val_fraction=0.01), tokenizer, split="train",
                           global_batch_size=1, seq_len=64)
    with pytest.raises(chat.ChatRecordError, match=rf"{tmp_path / 'long.jsonl'}:\d: the first assistant turn"):
        next(iter(batches))


def test_template_that_is_not_incremental_is_refused(files):
    _, tokenizer = files
    source = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"   # newest message first
    with pytest.raises(ValueError, match="is not incremental"):
        chat.tokenize(tokenizer, template(tokenizer, source), chat.parse_record(CONVERSATIONS[2], "t:1"))


def test_chat_settings_are_checked():
    config = default_data_config()
    config.format = "chat"
    with pytest.raises(DataConfigError, match="data.source='default': data.format='chat'"):
        validate_data_config(config)
    config.format, config.source = "text", "tasks"
    with pytest.raises(DataConfigError, match="data.format='chat'"):
        validate_data_config(config)
    config.format, config.chat_template = "chat", "/no/such/template.jinja"
    with pytest.raises(DataConfigError, match="data.chat_template='/no/such/template.jinja': no such file"):
        validate_data_config(config)


def test_generate_chat_renders_the_checkpoints_template(files, tmp_path, monkeypatch):
    """`generate.py --config.chat=True` sends exactly the fine-tuning prompt ids (template from the export)
    and stops at eos."""
    from hymba_jax.hf import save_hf_checkpoint
    from hymba_jax.loading import load_chat_template

    sys.path.insert(0, str(REPO))
    import generate     # generate.py, the command line

    directory, tokenizer = files
    config = hymba_tiny(**SMALL_MODEL, vocab_size=tokenizer.vocab_size)
    source = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}" \
             "{% if add_generation_prompt %}[assistant] {% endif %}"
    save_hf_checkpoint(tmp_path / "export", config, random_params(config), dtype="float32",
                       tokenizer=directory / "spm.model", chat_template=source)
    seen = {}

    class Recorder:
        def __init__(self, config, params, **kwargs):
            pass

        def generate(self, prompts, max_new_tokens, *, stop_ids, **kwargs):
            seen.update(prompts=prompts, stop_ids=stop_ids)
            return [[5] for _ in prompts]

    monkeypatch.setattr(generate, "Generator", Recorder)
    settings = generate.generate_config()
    settings.update(hf_checkpoint=str(tmp_path / "export"), chat=True, system="Be brief.", max_new_tokens=2,
                    compilation_cache_dir="")
    generate.generate(settings, prompts=["Name a colour."])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = tokenizer.encode_exact("[system] Be brief.") + [tokenizer.eos_id] + \
        tokenizer.encode_exact("[user] Name a colour.") + [tokenizer.eos_id] + tokenizer.encode_exact("[assistant] ")
    assert seen["prompts"] == [want]
    assert seen["prompts"][0] == chat.prompt_ids(tokenizer, template(tokenizer, source), messages)
    assert seen["stop_ids"] == [tokenizer.eos_id]
    (tmp_path / "export" / "tokenizer_config.json").write_text("{}")    # no template: the default one
    assert load_chat_template(str(tmp_path / "export"), tokenizer).source == chat.DEFAULT_CHAT_TEMPLATE


def test_generated_tasks_are_right_and_held_out(tmp_path):
    from hymba_jax.data import tasks
    from hymba_jax.data.sources import open_documents

    config = default_data_config()
    config.update(dict(source="tasks", format="chat", task_examples=600, cache_dir=str(tmp_path), val_fraction=0.1))
    splits = {s: [json.loads(d) for d in open_documents(config, s)] for s in ("train", "validation")}
    assert len(splits["train"]) + len(splits["validation"]) == 600 and len(splits["validation"]) > 30
    questions = {s: {r["messages"][0]["content"] for r in rs} for s, rs in splits.items()}
    assert not questions["train"] & questions["validation"]
    for record in splits["train"] + splits["validation"]:
        question, answer = (m["content"] for m in record["messages"])
        if record["task"] == "add":
            a, b = map(int, question.removeprefix("What is ").removesuffix("?").split(" + "))
            assert answer == str(a + b)
        elif record["task"] == "larger":
            assert answer == str(max(map(int, question.removeprefix("Which is larger, ").removesuffix("?").split(" or "))))
        else:
            assert answer == question.removeprefix("Repeat after me: ")
    assert {r["task"] for r in splits["train"]} == set(tasks.GENERATED_TASKS)
