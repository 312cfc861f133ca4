"""The tokenizer: loading it from a model folder, chat prompts, and the ids that stop generation.

Chat formatting, in order of preference:
1. the tokenizer's own chat template (tokenizer_config.json / chat_template.jinja), as transformers
   applies it;
2. for the Mistral/Mixtral SentencePiece vocabulary without a template (a base model, or the
   mistral-common v1 tokenizer), the Mistral v1 instruct format, token for token as mistral-common's
   `MistralTokenizer.v1()` encodes it:
       <s>[INST] user [/INST] assistant</s>[INST] user [/INST]
   System messages are joined with a blank line and put before the first user message's text, as
   mistral-common v1 does (it has no system role);
3. otherwise an error: the model has no chat template, use `generate` with a plain prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from quant.errors import MoEOffloadError

# A folder holds a tokenizer if it has one of these (tokenizer_config.json alone names a class, no vocab).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
ROLES = ("system", "user", "assistant")

# The Mistral v1 SentencePiece vocabulary (Mistral-7B, Mixtral-8x7B): 32000 pieces, <s> = 1, </s> = 2,
# and "[INST]" spelled as these three pieces. Llama-2's vocabulary has the same size and specials but
# other ids for "[INST]", so the pieces tell the two apart.
MISTRAL_V1_VOCAB_SIZE = 32000
MISTRAL_V1_INST_PIECES = {733: "▁[", 16289: "INST", 28793: "]"}
MESSAGE_JOIN = "\n\n"  # mistral-common joins system prompts, and consecutive same-role messages, with it


def load_tokenizer(path: str | Path):
    """The transformers tokenizer of a local model folder (never downloads, never runs remote code)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise MoEOffloadError(f"tokenizer folder {folder} does not exist; pass the model's folder")
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise MoEOffloadError(
            f"{folder} has no tokenizer files (none of {', '.join(VOCAB_FILES)}); "
            "copy them from the original model folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        # transformers checks config.json too; its validation errors name the field on one line, the fault on the next
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise MoEOffloadError(f"cannot load the tokenizer in {folder}: {detail}") from exc


def read_generation_config(folder: str | Path) -> dict | None:
    """generation_config.json of a model folder as a dict, or None when the folder has none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoEOffloadError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc


def stop_ids(tokenizer, generation_config: dict | None, model_eos: Iterable[int] = ()) -> set[int]:
    """Every id that ends generation: generation_config.json's eos_token_id (an int or a list of ints), or where
    it names none config.json's (`model_eos`), as transformers' generate takes them; and the tokenizer's eos token
    (None: no tokenizer, for token ids in and out). Chat models often list their end-of-turn token only in the
    generation config."""
    ids: set[int] = set()
    eos = (generation_config or {}).get("eos_token_id")
    for token_id in eos if isinstance(eos, list) else [eos]:
        if token_id is None:
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise MoEOffloadError(
                f"generation_config.json has eos_token_id {eos!r}; it must be an integer or a list of integers"
            )
        ids.add(token_id)
    if not ids:
        ids.update(model_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def is_mistral_v1_vocab(tokenizer) -> bool:
    """True for the Mistral/Mixtral v1 SentencePiece vocabulary, however transformers loaded it."""
    if len(tokenizer) != MISTRAL_V1_VOCAB_SIZE or tokenizer.bos_token_id != 1 or tokenizer.eos_token_id != 2:
        return False
    pieces = tokenizer.convert_ids_to_tokens(list(MISTRAL_V1_INST_PIECES))
    return pieces == list(MISTRAL_V1_INST_PIECES.values())


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of a conversation that ends with a user message, ready for the assistant's turn."""
    _check_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(i) for i in ids]
    if is_mistral_v1_vocab(tokenizer):
        return mistral_v1_prompt_ids(tokenizer, messages)
    raise MoEOffloadError(
        "this model's tokenizer has no chat template (it is likely a base model); "
        "use `moe-offload generate --prompt TEXT` to continue plain text"
    )


def mistral_v1_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The Mistral v1 instruct format: <s>[INST] user [/INST] assistant</s>[INST] user [/INST].

    Each piece is encoded on its own, as mistral-common does, so each gets SentencePiece's leading
    space. Message text is plain text: a "</s>" typed by the user stays characters, not a token.
    """
    system_parts: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, content), consecutive same-role messages merged
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            if turns:
                raise MoEOffloadError(
                    "a system message must come before the first user message in the Mistral chat format"
                )
            if content:
                system_parts.append(content)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + MESSAGE_JOIN + content)
        else:
            turns.append((role, content))
    if turns[0][0] != "user":
        raise MoEOffloadError("the first non-system chat message must come from the user")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    ids = [tokenizer.bos_token_id]
    for index, (role, content) in enumerate(turns):
        if role == "user":
            if index == 0 and system_parts:
                content = MESSAGE_JOIN.join(system_parts) + MESSAGE_JOIN + content
            ids += encode(f"[INST] {content} [/INST]")
        else:
            ids += encode(content) + [tokenizer.eos_token_id]
    return ids


def check_text(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot encode: bytes that were not UTF-8 (a terminal in another encoding, a
    binary file) reach Python as lone surrogates, which the tokenizer refuses with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = ord(text[error.start])
        found = f"the byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise MoEOffloadError(f"{what} is not valid UTF-8 text: {found} at character {error.start}") from None


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise MoEOffloadError("the conversation is empty; give at least one user message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise MoEOffloadError(
                f"chat message {index} must be a dict with role one of {', '.join(ROLES)}, got {message!r}"
            )
        if not isinstance(message.get("content"), str):
            raise MoEOffloadError(f"chat message {index} ({message['role']}) must have string content")
        check_text(message["content"], f"chat message {index} ({message['role']})")
    if messages[-1]["role"] != "user":
        raise MoEOffloadError(f"the last chat message must come from the user, got {messages[-1]['role']!r}")
