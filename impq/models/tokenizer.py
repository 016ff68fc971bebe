"""The checkpoint's tokenizer (tokenizer.json through the `tokenizers` library) and Imp's way of tokenizing
a prompt around `<image>`: each text piece is tokenized on its own, as llama.cpp's mtmd does too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import ImpqError
from .checkpoint import read_json


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    tokenizer_json: dict
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    path: Path

    @classmethod
    def from_folder(cls, folder: Path, add_bos: bool) -> "TextTokenizer":
        """`add_bos`: the family's default where tokenizer_config.json does not say."""
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ImpqError(path, "missing tokenizer (only tokenizer.json fast tokenizers are read)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            tokenizer = Tokenizer.from_str(json.dumps(raw))
        except Exception as err:  # tokenizers raises plain Exceptions for malformed files
            raise ImpqError(path, f"cannot read tokenizer ({err})") from None
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}

        def token_id(key: str) -> int | None:
            text = _token_text(config.get(key))
            return None if text is None else tokenizer.token_to_id(text)

        return cls(tokenizer, raw, token_id("bos_token"), token_id("eos_token"),
                   bool(config.get("add_bos_token", add_bos)), path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str, image_token: str) -> list[list[int]]:
        """Token ids of the text pieces around each image placeholder, BOS on the first piece if the model uses one."""
        pieces = [self.encode(piece) for piece in prompt.split(image_token)]
        if self.add_bos and self.bos_id is not None:
            pieces[0] = [self.bos_id, *pieces[0]]
        return pieces

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
