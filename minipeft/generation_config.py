"""What a model folder's files say about generating from it, read as transformers 5.25 reads them:
the special tokens around a text prompt (tokenizer_config.json) and the ids that stop generation
(generation_config.json)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from .files import read_json

PathLike = Union[str, os.PathLike]


def _json_object(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object in `path`, None when the file is absent; an error naming it otherwise."""
    if not path.is_file():
        return None
    obj = read_json(path, "a model folder's settings")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def prompt_special_tokens(model_dir: PathLike) -> tuple[bool, bool]:
    """(add_bos, add_eos): whether a prompt's ids start with bos and end with eos, as transformers'
    tokenizer (and so its text-generation pipeline) encodes it for a SentencePiece folder:
    tokenizer_config.json's add_bos_token / add_eos_token, each False when absent or null
    (transformers 5.x; 4.x's LlamaTokenizer defaulted add_bos_token to True)."""
    path = Path(model_dir) / "tokenizer_config.json"
    cfg = _json_object(path) or {}
    flags = []
    for key in ("add_bos_token", "add_eos_token"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{path}: {key} must be true or false, got {value!r}")
        flags.append(bool(value))
    return flags[0], flags[1]


def stop_token_ids(model_dir: PathLike, vocab_size: int, default: Optional[Union[int, list[int]]]) -> list[int]:
    """The ids generation stops at: generation_config.json's eos_token_id (one id or a list, as
    transformers' generate stops at any of them), else `default` (config.json's eos_token_id, an id or
    a list, which transformers takes when the folder has no generation_config.json); [] when neither sets one.

    A generation_config.json without eos_token_id falls back to `default` too (transformers would
    then never stop: a folder that names an eos token elsewhere does not mean that)."""
    path = Path(model_dir) / "generation_config.json"
    value = (_json_object(path) or {}).get("eos_token_id")
    if value is None:  # config.json's eos_token_id may be a list too (ModelConfig)
        return [] if default is None else list(default) if isinstance(default, list) else [default]
    ids = value if isinstance(value, list) else [value]
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad or not ids:
        raise ValueError(f"{path}: eos_token_id must be a token id or a non-empty list of them, each an integer "
                         f"in [0, {vocab_size}), got {value!r}")
    return ids
