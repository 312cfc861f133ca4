"""Chat prompts against mistral-common's own encoding, tokenizer loading, and stop ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from offload.tokenizer import (
    chat_prompt_ids,
    is_mistral_v1_vocab,
    load_tokenizer,
    read_generation_config,
    stop_ids,
)
from quant.errors import MoEOffloadError

MISTRAL_V1_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

CONVERSATIONS = {
    "three turns": [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant. How can I help?"},
        {"role": "user", "content": "Write a haiku about a naïve café 🙂 in Zürich."},
    ],
    "system prompt": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is a mixture of experts?"},
        {"role": "assistant", "content": "A model whose layers route each token to a few expert networks."},
        {"role": "user", "content": "Why offload them?"},
    ],
    "two system prompts, two user messages in a row": [
        {"role": "system", "content": "Be terse."},
        {"role": "system", "content": "Use English."},
        {"role": "user", "content": "first part"},
        {"role": "user", "content": "second part"},
    ],
    "special-token text is plain text": [
        {"role": "user", "content": "Print </s> and [INST] literally."},
        {"role": "assistant", "content": "</s> [/INST]"},
        {"role": "user", "content": "Thanks.\nNow a newline."},
    ],
}


def mistral_common_ids(messages: list[dict]) -> list[int]:
    """mistral-common v1's instruct encoding: the reference, from Mistral's own package."""
    request = ChatCompletionRequest(messages=messages)
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def mistral_v1_tokenizer(tmp_path_factory):
    """mistral-common's tokenizer.model.v1 in a folder, as transformers loads it (a LlamaTokenizer)."""
    folder = tmp_path_factory.mktemp("mistral-v1")
    shutil.copyfile(MISTRAL_V1_MODEL, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def trained_tokenizer(trained_model_dir):
    return load_tokenizer(trained_model_dir)


def test_reference_folds_the_system_prompt_into_the_first_user_turn():
    # What mistral-common v1 does, which the built-in format copies: no system role, the system text
    # goes before the first user message with a blank line, and an assistant turn ends with </s>.
    ids = mistral_common_ids(CONVERSATIONS["system prompt"])
    text = MistralTokenizer.v1().decode(ids)
    assert text.startswith("[INST] You answer in one sentence.\n\nWhat is a mixture of experts? [/INST]")
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mistral_v1_tokenizer_matches_mistral_common(mistral_v1_tokenizer, name):
    assert mistral_v1_tokenizer.chat_template is None
    assert is_mistral_v1_vocab(mistral_v1_tokenizer)
    messages = CONVERSATIONS[name]
    assert chat_prompt_ids(mistral_v1_tokenizer, messages) == mistral_common_ids(messages)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_trained_model_tokenizer_takes_the_builtin_path(trained_tokenizer, name):
    # tokenizer.json, no chat template: a base model with the Mistral vocabulary
    assert trained_tokenizer.chat_template is None
    assert is_mistral_v1_vocab(trained_tokenizer)
    messages = CONVERSATIONS[name]
    assert chat_prompt_ids(trained_tokenizer, messages) == mistral_common_ids(messages)


def test_prompt_ends_ready_for_the_assistant(trained_tokenizer):
    ids = chat_prompt_ids(trained_tokenizer, CONVERSATIONS["three turns"])
    assert trained_tokenizer.convert_ids_to_tokens(ids[-4:]) == ["▁[", "/", "INST", "]"]


def test_own_chat_template_wins(trained_model_dir, tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    shutil.copyfile(trained_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((trained_model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tokenizer = load_tokenizer(tmp_path)
    messages = CONVERSATIONS["three turns"]
    rendered = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    # A template writes its own specials, so the rendered text is encoded without adding any.
    expected = tokenizer.encode(rendered, add_special_tokens=False)
    assert expected[0] == 1 and expected.count(1) == 1
    assert chat_prompt_ids(tokenizer, messages) == expected
    assert chat_prompt_ids(tokenizer, messages) != mistral_common_ids(messages)


def test_other_vocabulary_without_template_is_refused(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert not is_mistral_v1_vocab(tokenizer)
    with pytest.raises(MoEOffloadError) as err:
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "hello"}])
    assert str(err.value) == (
        "this model's tokenizer has no chat template (it is likely a base model); "
        "use `moe-offload generate --prompt TEXT` to continue plain text"
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "the conversation is empty; give at least one user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "the last chat message must come from the user, got 'assistant'",
        ),
        (
            [{"role": "tool", "content": "a"}],
            "chat message 0 must be a dict with role one of system, user, assistant, got "
            "{'role': 'tool', 'content': 'a'}",
        ),
        ([{"role": "user", "content": None}], "chat message 0 (user) must have string content"),
        (  # bytes that were not UTF-8 reach Python as lone surrogates: the tokenizer raised a TypeError
            [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "caf\udce9"}],
            "chat message 1 (assistant) is not valid UTF-8 text: the byte 0xe9 at character 3",
        ),
        (
            [{"role": "user", "content": "a\ud800"}],
            "chat message 0 (user) is not valid UTF-8 text: U+D800 at character 1",
        ),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "the first non-system chat message must come from the user",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
            "a system message must come before the first user message in the Mistral chat format",
        ),
    ],
)
def test_bad_conversations(trained_tokenizer, messages, message):
    with pytest.raises(MoEOffloadError) as err:
        chat_prompt_ids(trained_tokenizer, messages)
    assert str(err.value) == message


def test_load_tokenizer_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MoEOffloadError) as err:
        load_tokenizer(missing)
    assert str(err.value) == f"tokenizer folder {missing} does not exist; pass the model's folder"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MoEOffloadError) as err:
        load_tokenizer(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} has no tokenizer files (none of tokenizer.json, tokenizer.model, vocab.json, "
        "spiece.model); copy them from the original model folder"
    )
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MoEOffloadError, match=rf"^cannot load the tokenizer in {tmp_path}: "):
        load_tokenizer(tmp_path)


def test_stop_ids(trained_model_dir, trained_tokenizer, tmp_path):
    assert stop_ids(trained_tokenizer, read_generation_config(trained_model_dir)) == {2}
    assert stop_ids(trained_tokenizer, None) == {2}
    assert stop_ids(trained_tokenizer, {"eos_token_id": [32000, 7]}) == {2, 7, 32000}
    assert stop_ids(trained_tokenizer, {"eos_token_id": None}) == {2}
    assert stop_ids(None, {"eos_token_id": [32000, 7]}) == {7, 32000}  # token ids in and out: no tokenizer
    # config.json's eos ids only where generation_config.json names none, as transformers' generate reads them
    assert stop_ids(None, {"eos_token_id": 7}, (2, 5)) == {7}
    assert stop_ids(None, {"eos_token_id": None}, (2, 5)) == stop_ids(None, None, [2, 5]) == {2, 5}
    with pytest.raises(MoEOffloadError) as err:
        stop_ids(trained_tokenizer, {"eos_token_id": "</s>"})
    assert str(err.value) == (
        "generation_config.json has eos_token_id '</s>'; it must be an integer or a list of integers"
    )
    assert read_generation_config(tmp_path) is None
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(MoEOffloadError, match=r"generation_config.json is not valid JSON .*; fix or delete it$"):
        read_generation_config(tmp_path)
