"""SentencePiece tokenizer: encode/decode, Hugging Face tokenizer directories, and training.

LLaMA-family checkpoints ship `tokenizer.model`, a SentencePiece model (Kudo & Richardson, 2018):
text -> pieces ("▁Hello", "<0x0A>", ...) -> ids. `Tokenizer` wraps the model file as is (read
with sentencepiece's own parser, never unpickled) and adds what training and serving need:
bos/eos/pad ids read from the checkpoint's config files, padded batches, and a directory that
`transformers.LlamaTokenizer` loads to the same ids (tests/test_tokenizer.py checks parity).

Id layout of `train_tokenizer` (LLaMA's, plus a pad token and the chat tokens):
    0 <unk>   1 <s> (bos)   2 </s> (eos)   3 <pad>   4.. special tokens (<|im_start|>, <|im_end|>)
    then the 256 byte pieces <0x00>..<0xFF> (byte_fallback: any UTF-8 text encodes, no <unk>)
    then the learned pieces.
Special tokens are SentencePiece `user_defined_symbols`: wherever they occur in text they encode
as their single id, unless `encode(text, split_special_tokens=True)` spells them as ordinary
text (the chat templates encode messages so: a message cannot forge a turn).

The leading space. SentencePiece encodes a text as if a space preceded it (the "dummy prefix"):
encode("Hi") is ["▁Hi"], so encode("a") + encode("b") decodes to "a b", not "ab". That is right
for a text that starts a document or follows a space, and wrong for a text that continues
another one, e.g. right after a special token. `encode(text, add_dummy_prefix=False)` encodes a
continuation: the same pieces a whole-string encode gives for text that follows a special token.
The chat templates choose per segment (minipeft/templates.py); that choice is what makes their
ids equal the tokenization of the whole rendered string.

Known differences from transformers (not bugs here): for a text that starts with whitespace, or
with a special token, SentencePiece still adds the dummy "▁" and `transformers`' Metaspace
pre-tokenizer does not; and a literal "<s>" or "</s>" in the text stays characters here, where
transformers reads it as the control token. Decoding: with skip_special_tokens=False
the text after a control token loses its leading "▁" here ("<s>Hello</s>next") and keeps it as a
space in transformers ("<s> Hello</s> next"); and a run of byte pieces that is not valid UTF-8
becomes one U+FFFD per invalid byte here, keeping any valid byte in it (<0xE4><0xB8><0x41> -> "��A"),
where transformers replaces every byte of the run ("���").
"""
from __future__ import annotations

import io
import json
import operator
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import sentencepiece as spm
import torch

from .batching import pad_rows
from .files import existing_file, json_bytes, write_atomic
from .generation_config import prompt_special_tokens
from .sp_model import NO_DUMMY_PREFIX, user_defined_as_unused

PathLike = Union[str, os.PathLike]
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # name tokens: "eos_token": "</s>"
CONFIG_FILES = TOKEN_FILES + ("generation_config.json", "config.json")  # give ids: "eos_token_id": 2
MAX_LINE_BYTES = 4192  # SentencePiece's default max_sentence_length (LLaMA's too): longer lines are not trained on


def check_unicode(text: str, what: str = "the text") -> None:
    """ValueError if `text` holds an unpaired surrogate ("\ud83d" alone: half of a UTF-16 pair, which
    JSON's escapes can carry), naming `what` and the character's position: it is not a character,
    and sentencepiece fails on it with a RuntimeError about a C++ cast."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds an unpaired surrogate {text[e.start]!r} at character {e.start} "
                         "(half of a UTF-16 pair, not a character)") from None


def _own_id(i: int) -> Optional[int]:
    return i if i >= 0 else None  # sentencepiece says -1 for "the model has no such token"


class Tokenizer:
    """A SentencePiece model plus its bos/eos/pad ids and the names of its special tokens.

    bos_id / eos_id / pad_id default to the model's own (None when it has none); pad_id falls
    back to unk (0 in LLaMA), as Alpaca and QLoRA do. Never eos: a collator that masks pad ids
    out of the labels would then also mask every eos, and the model would never learn to stop.
    add_bos_token / add_eos_token: whether a text prompt gets bos / eos (transformers' encode(),
    and so its pipelines and vLLM's server), as tokenizer_config.json records them: kept from the
    folder it was loaded from, written back by save_pretrained. Default: bos where there is one.
    """

    def __init__(self, model_proto: bytes, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, special_tokens: Sequence[str] = (), source: str = "<bytes>",
                 add_bos_token: Optional[bool] = None, add_eos_token: bool = False):
        if not model_proto:  # sentencepiece loads b"" without error, as a model that fails at first use
            raise ValueError(f"{source}: not a SentencePiece model (the file is empty)")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        self._proto = model_proto
        # encode's variants of the model, keyed (add_dummy_prefix, split_special_tokens): built on first use
        self._encoders = {(True, False): self._sp}
        self.bos_id = _own_id(self._sp.bos_id()) if bos_id is None else self._check_id(bos_id, "bos_id")
        self.eos_id = _own_id(self._sp.eos_id()) if eos_id is None else self._check_id(eos_id, "eos_id")
        pad = _own_id(self._sp.pad_id()) if pad_id is None else self._check_id(pad_id, "pad_id")
        self.pad_id = self._sp.unk_id() if pad is None else pad
        self.special_tokens = tuple(special_tokens)
        self.add_bos_token = self.bos_id is not None if add_bos_token is None else add_bos_token
        self.add_eos_token = add_eos_token
        self._control_ids = frozenset(i for i in range(self.vocab_size)
                                      if self._sp.is_control(i) or self._sp.is_unknown(i))
        self._special_ids = self._control_ids | {self.token_to_id(t) for t in self.special_tokens}

    @classmethod
    def from_file(cls, model_file: PathLike) -> "Tokenizer":
        """A tokenizer.model file alone: the ids are the model's own."""
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; expected a SentencePiece tokenizer.model")
        return cls(path.read_bytes(), source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def _check_id(self, i: int, name: str) -> int:
        try:
            index = operator.index(i)  # ints, numpy ints, integer 0-d tensors; not 1.5 (int() would cut it to 1)
        except TypeError:
            raise ValueError(f"{name}={i!r} is not an integer token id") from None
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"{name}={i} is outside the vocabulary [0, {self.vocab_size})")
        return index

    def token_to_id(self, piece: str) -> int:
        """The id of a piece; KeyError if the vocabulary lacks it (sentencepiece itself says unk)."""
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) != piece:
            raise KeyError(f"{piece!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(self._check_id(i, "id"))

    def encode(self, text: str, bos: bool = False, eos: bool = False, add_dummy_prefix: bool = True,
               split_special_tokens: bool = False) -> list[int]:
        """text -> ids, optionally framed by bos/eos.

        add_dummy_prefix=False encodes `text` as the continuation of preceding text (no "▁" is
        prepended); True keeps the model's own setting (LLaMA: prepend "▁").
        split_special_tokens=True (transformers' name and meaning) encodes a special token's text
        ("<|im_end|>") as ordinary pieces, not as its id: for text a user wrote, which must not
        close a chat turn. Text that is not Unicode (an unpaired surrogate, "\ud83d": half of a
        UTF-16 pair) is a ValueError saying where, not sentencepiece's RuntimeError about a C++ cast.
        """
        check_unicode(text)
        ids = self._encoder(add_dummy_prefix, split_special_tokens).encode(text)
        if bos:
            ids.insert(0, self._require(self.bos_id, "bos"))
        if eos:
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def _encoder(self, add_dummy_prefix: bool, split_special_tokens: bool) -> spm.SentencePieceProcessor:
        key = (add_dummy_prefix, split_special_tokens)
        if key not in self._encoders:
            proto = user_defined_as_unused(self._proto) if split_special_tokens else self._proto
            self._encoders[key] = spm.SentencePieceProcessor(
                model_proto=proto + (b"" if add_dummy_prefix else NO_DUMMY_PREFIX))
        return self._encoders[key]

    @staticmethod
    def _require(i: Optional[int], name: str) -> int:
        if i is None:
            raise ValueError(f"this tokenizer has no {name} token")
        return i

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """ids -> text. Special ids are control/unk pieces and `special_tokens`.

        skip_special_tokens=False writes control pieces as their text ("<s>"); the text between
        them decodes as SentencePiece decodes a whole sequence (its leading "▁" dropped).
        """
        ids = [self._check_id(i, "id") for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        out, run = [], []
        for i in ids:
            if i in self._control_ids:  # sentencepiece would decode these to nothing
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)

    def batch_encode(self, texts: Sequence[str], padding_side: str = "left", max_length: Optional[int] = None,
                     bos: bool = False, eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (input_ids (B, T), attention_mask (B, T)), both int64, T = longest row.

        Rows are cut to their first max_length ids, then padded with pad_id on `padding_side`
        ("left" for generation: every row's last prompt token lands in the last column).
        Training batches come from minipeft.batching.collate instead (labels, -100 padding).
        """
        if not texts:
            raise ValueError("batch_encode needs at least one text")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        rows = [self.encode(t, bos=bos, eos=eos)[:max_length] for t in texts]
        return pad_rows(rows, self.pad_id, padding_side), pad_rows([[1] * len(r) for r in rows], 0, padding_side)

    def _piece(self, i: Optional[int]) -> Optional[str]:
        return None if i is None else self._sp.id_to_piece(i)

    def save_pretrained(self, path: PathLike) -> None:
        """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json into `path`.

        Each file is replaced atomically; other files in `path` (config.json, weights) stay.
        `add_bos_token` is LLaMA's convention for transformers: its encode() then prepends bos.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        names = {"bos_token": self._piece(self.bos_id), "eos_token": self._piece(self.eos_id),
                 "unk_token": self._piece(self._sp.unk_id()), "pad_token": self._piece(self.pad_id)}
        special = list(self.special_tokens)
        config = {"tokenizer_class": "LlamaTokenizer", **names, "additional_special_tokens": special,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "clean_up_tokenization_spaces": False}
        write_atomic(path / "tokenizer.model", self._proto)
        write_atomic(path / "tokenizer_config.json", json_bytes(config))
        write_atomic(path / "special_tokens_map.json", json_bytes({**names, "additional_special_tokens": special}))


# --- loading from a checkpoint directory ---------------------------------------------------
def _read_json(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_text(value: Any) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _lookup(tok: Tokenizer, piece: str, where: str) -> int:
    try:
        return tok.token_to_id(piece)
    except KeyError:
        raise ValueError(f"{where}: {piece!r} is not in tokenizer.model's vocabulary "
                         "(tokens added outside the SentencePiece model are not supported)") from None


def _configured_id(tok: Tokenizer, cfg: dict[str, Any], where: Path, name: str) -> Optional[int]:
    """The id one config file sets for bos/eos/pad, or None. Tokenizer files name the token
    ("</s>", checked against the vocabulary); the model configs give its id (a list of eos ids,
    as generation_config.json may hold, contributes its first). A list of bos or pad ids is refused:
    transformers' config classes refuse it in config.json, GenerationConfig a pad list, and its
    generate() cannot start from a bos list (no one id to choose)."""
    if where.name in TOKEN_FILES:
        text = _token_text(cfg.get(f"{name}_token"))
        return None if text is None else _lookup(tok, text, f"{where}: {name}_token")
    value = cfg.get(f"{name}_token_id")
    if isinstance(value, list):
        if name != "eos":
            raise ValueError(f"{where}: {name}_token_id must be an integer token id or null (transformers takes "
                             f"no list here; only eos_token_id may be one), got {value!r}")
        value = value[0] if value else None
    return None if value is None else tok._check_id(value, f"{where}: {name}_token_id")


def _resolve_ids(tok: Tokenizer, configs: dict[str, dict[str, Any]], folder: Path) -> dict[str, int]:
    """bos/eos/pad ids: per id, the first file in CONFIG_FILES order that sets it (non-null) wins."""
    found: dict[str, int] = {}
    for name in ("bos", "eos", "pad"):
        for file, cfg in configs.items():
            i = _configured_id(tok, cfg, folder / file, name)
            if i is not None:
                found[name] = i
                break
    return found


def _special_tokens(configs: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """(where, tokens): the first list of extra special tokens the tokenizer files give."""
    for file in TOKEN_FILES:
        for key in ("additional_special_tokens", "extra_special_tokens"):  # transformers 4.x, 5.x
            value = (configs.get(file) or {}).get(key)
            if isinstance(value, list):
                return f"{file}: {key}", [_token_text(v) for v in value]
    return "", []


def load_tokenizer(path: PathLike) -> Tokenizer:
    """A Hugging Face model directory (reads tokenizer.model + the config files) or a .model file.

    Ids precedence (first that sets one wins, per id): tokenizer_config.json, special_tokens_map.json,
    generation_config.json, config.json, then the SentencePiece model itself. A bare .model file
    uses only its own ids.
    """
    path = Path(path)
    if path.is_file():
        return Tokenizer.from_file(path)
    model_file = path / "tokenizer.model"
    if not model_file.is_file():
        hint = (" (found tokenizer.json: only SentencePiece tokenizers, as LLaMA and Mistral ship, are supported)"
                if (path / "tokenizer.json").is_file() else "")
        raise FileNotFoundError(f"{model_file}: missing; a SentencePiece model directory needs tokenizer.model{hint}")
    configs = {f: c for f in CONFIG_FILES if (c := _read_json(path / f)) is not None}
    base = Tokenizer.from_file(model_file)
    where, special = _special_tokens(configs)
    for piece in special:
        _lookup(base, piece, str(path / where))
    ids = _resolve_ids(base, configs, path)
    add_bos, add_eos = prompt_special_tokens(path)
    return Tokenizer(base._proto, **{f"{k}_id": v for k, v in ids.items()}, special_tokens=special,
                     source=str(model_file), add_bos_token=add_bos, add_eos_token=add_eos)


# --- training ------------------------------------------------------------------------------
def _lines(files: Sequence[PathLike]) -> Iterator[str]:
    """Non-empty lines of UTF-8 text files, without their line ending."""
    for file in files:
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{file}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if line.strip():
                    yield line


def train_tokenizer(text_files: Sequence[PathLike], out_dir: PathLike, vocab_size: int, model_type: str = "bpe",
                    special_tokens: Sequence[str] = CHAT_TOKENS, character_coverage: float = 0.9995,
                    byte_fallback: bool = True) -> Tokenizer:
    """Train a SentencePiece model on text files (one sentence or paragraph a line), save to out_dir.

    Options are LLaMA's (identity normalization, no whitespace collapsing, split digits, byte
    fallback) with the id layout in the module docstring. character_coverage is the share of
    characters that get their own piece (0.9995 is SentencePiece's advice for CJK-rich text);
    the rest fall back to bytes. Deterministic: one training thread and text fed from memory, so
    the same files and options give a byte-identical tokenizer.model (no paths are recorded).
    Lines longer than MAX_LINE_BYTES (4192) bytes are skipped by SentencePiece.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not text_files:
        raise ValueError("text_files is empty; train_tokenizer reads UTF-8 text files, one text a line")
    for f in text_files:
        existing_file(f, "train_tokenizer reads UTF-8 text files")
    reserved = {"<unk>", "<s>", "</s>", "<pad>"}
    if len(set(special_tokens)) != len(special_tokens) or reserved & set(special_tokens):
        raise ValueError(f"special_tokens must be distinct and not in {sorted(reserved)}, got {list(special_tokens)}")
    model = io.BytesIO()
    usable = [False]  # a line SentencePiece keeps was read: noted now, as a pipe cannot be read again

    def lines() -> Iterator[str]:
        for line in _lines(text_files):
            usable[0] = usable[0] or len(line.encode("utf-8")) <= MAX_LINE_BYTES
            yield line

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(special_tokens), num_threads=1,
            minloglevel=2)
    except RuntimeError as e:
        files = [str(f) for f in text_files]
        if not usable[0]:  # sentencepiece's message for this case is "[!sentences_.empty()]"
            raise ValueError(f"{files}: no non-empty line of at most {MAX_LINE_BYTES} bytes to train a "
                             "tokenizer on (SentencePiece skips longer lines)") from None
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece {model_type} vocabulary from "
                         f"{files}: {e}") from None
    tok = Tokenizer(model.getvalue(), special_tokens=special_tokens)
    tok.save_pretrained(out_dir)
    return tok
