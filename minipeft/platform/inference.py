"""Serving: a pool of loaded models, adapters switched per request, token-by-token generation.

A callable name (a base model or a deployment) resolves to a `Target`: the weights it runs on and
its adapter, if any. Targets that share weights, quantization and adapter kind share one loaded
model: a PeftModel holding every deployment's adapter under the deployment's name. Base-model
requests use a plain copy of the base.

Generation is the loop of minipeft.generation.generate for one sequence (KV cache, sample_next),
written as a generator so replies can stream:

    step t:   with the model's lock:  set_adapter(name); logits = model(step_ids, mask, cache)[:, -1]
              logits = apply_penalties(logits, counts, presence, frequency)    (when one is non-zero)
              next = sample_next(logits, temperature, top_p)       (argmax when temperature == 0)
              stop if next is one of the template's stop ids, else yield it and count it

Each request owns its KV cache and the lock is held for one forward only, so concurrent requests
for different adapters interleave step by step, each always running with its own adapter. Greedy
replies equal generate()'s token for token (tests/test_platform.py). Models load on a GPU when
torch sees one, else on the CPU.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ..checkpoint import load_pretrained
from ..distributed import use_device
from ..generation import apply_penalties, sample_next
from ..model import KVCache, Transformer
from ..peft_config import PeftConfig
from ..peft_model import PeftModel
from ..templates import TEMPLATE_FILE, ChatTemplate, get_template, load_template
from ..tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class Target:
    name: str  # what requests call it
    weights_dir: Path
    adapter_dir: Optional[Path] = None
    quantized: bool = False  # a QLoRA adapter runs on the NF4 base it was trained with

    def key(self) -> tuple:
        kind = PeftConfig.load(self.adapter_dir).peft_type if self.adapter_dir else None
        return (str(self.weights_dir), self.quantized, kind)


@dataclass
class Loaded:
    """One model in memory and the adapters (deployment name -> chat template) it holds."""
    model: Union[Transformer, PeftModel]
    tokenizer: Tokenizer
    templates: dict[Optional[str], ChatTemplate]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def virtual_tokens(self, adapter: Optional[str]) -> int:
        """Positions `adapter` (prefix or prompt tuning) puts before a request's tokens, in the context."""
        config = self.model.peft_config.get(adapter) if adapter is not None else None
        return config.virtual_tokens if config is not None else 0  # removed meanwhile: logits() says so

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    def logits(self, adapter: Optional[str], ids: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Next-token logits (1, vocab) with `adapter` active; raises ValueError if it was removed."""
        with self.lock, torch.no_grad():
            if adapter is not None and self.model.active_adapter != adapter:
                self.model.set_adapter(adapter)
            return self.model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1, :]


def _template_of(folder: Path) -> ChatTemplate:
    return load_template(folder) if (folder / TEMPLATE_FILE).is_file() else get_template("plain")


class ModelPool:
    def __init__(self, device: str = "auto") -> None:
        """device: where the models load (TrainConfig.device's names: auto, cpu, cuda, cuda:N)."""
        self.device = device
        self._loaded: dict[tuple, Loaded] = {}
        self._where: dict[str, tuple] = {}  # target name -> key of the model holding it
        self._lock = threading.Lock()

    def get(self, target: Target) -> tuple[Loaded, Optional[str], ChatTemplate]:
        """The loaded model serving `target` (loaded now if needed), its adapter name and template.
        An adapter that fails to load raises and leaves the model as it was, serving the others."""
        adapter = target.name if target.adapter_dir else None
        with self._lock:
            key = self._where.get(target.name) or target.key()
            loaded = self._loaded.get(key) or self._load_base(target)
            if adapter is not None and adapter not in loaded.templates:
                with loaded.lock:
                    self._add_adapter(loaded, target)
            self._loaded[key] = loaded  # only now: a base loaded for an adapter that failed is not kept
            self._where[target.name] = key
            return loaded, adapter, loaded.templates[adapter]

    def _load_base(self, target: Target) -> Loaded:
        model = load_pretrained(target.weights_dir, device=use_device(self.device),
                                quantization="nf4" if target.quantized else None).eval()
        return Loaded(model, load_tokenizer(target.weights_dir), {None: _template_of(target.weights_dir)})

    @staticmethod
    def _add_adapter(loaded: Loaded, target: Target) -> None:
        """Attach `target`'s adapter, or raise with the model unchanged: the template is read first,
        and PeftModel takes off an adapter whose load it refuses (the bare base comes back bare)."""
        template = _template_of(target.adapter_dir)
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(target.adapter_dir, target.name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, target.adapter_dir, adapter_name=target.name)
        loaded.model.eval()
        loaded.templates[target.name] = template

    def remove(self, name: str) -> None:
        """Drop a deployment: its adapter, or the whole model when no other name uses it (a full
        fine-tune's deployment has no adapter; requests still running keep their reference)."""
        with self._lock:
            key = self._where.pop(name, None)
            loaded = self._loaded.get(key)
            if loaded is None:
                return
            if key not in self._where.values():
                del self._loaded[key]
            elif name in loaded.templates:
                with loaded.lock:
                    del loaded.templates[name]
                    loaded.model.delete_adapter(name)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def stream_tokens(loaded: Loaded, adapter: Optional[str], prompt: Sequence[int], sampling: Sampling,
                  stop_ids: Sequence[int]) -> Iterator[int]:
    """Reply token ids, one at a time; ends at a stop id (not yielded) or after max_tokens."""
    device = loaded.device  # the sampling generator too: multinomial draws where the probabilities are
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device).manual_seed(sampling.seed)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    cache = KVCache(loaded.model.config.num_hidden_layers)
    counts = torch.zeros(1, loaded.model.config.vocab_size, dtype=torch.long, device=device)  # of each reply token
    step = ids
    for _ in range(sampling.max_tokens):
        logits = loaded.logits(adapter, step, mask, cache)
        if sampling.presence_penalty or sampling.frequency_penalty:
            logits = apply_penalties(logits, counts, sampling.presence_penalty, sampling.frequency_penalty)
        nxt = sample_next(logits, sampling.temperature, None, sampling.top_p, generator)
        token = int(nxt)
        if token in stop_ids:
            return
        yield token
        counts[0, token] += 1
        step = nxt[:, None]
        mask = torch.cat((mask, torch.ones_like(step)), dim=1)


class TextStream:
    """Token ids in, text deltas out: decode everything so far and emit what is new, holding back
    a trailing U+FFFD (a character whose UTF-8 bytes are split across byte-fallback tokens).

    context: ids the text continues (a completion's prompt), decoded with it and not emitted.
    SentencePiece drops the leading space of a text's first piece ("▁value" alone is "value"),
    right for a new text (a chat reply) but not for a continuation: after "returns the" the reply
    is " value". Its last id is enough context: decoding is piece by piece, and a prompt ends
    with a whole character."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer, self.ids = tokenizer, list(context[-1:])
        self.sent = tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self) -> str:
        """The rest (call once, at the end): the deltas then add up to the text of all ids."""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


class StopText:
    """Text deltas in, text deltas out, cut just before the first occurrence of any stop string
    (OpenAI's `stop`); `stopped` tells that one occurred, and nothing after it is released.

    The hold-back: a stop string may arrive in pieces, over several tokens or from inside one, so
    the longest tail of the text so far that is the beginning of some stop string ("ap" of "apple")
    is held, not released. Later deltas show whether it grows into a stop string (then it and all
    after it are dropped) or not (then it is released, less any new tail that could begin one);
    finish() releases what is held when the reply ends. No stop string can begin in released text,
    so the text held plus the new delta is all there is to search, and its earliest match is the
    reply's first.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held, self.stopped = list(stops), "", False

    def push(self, delta: str) -> str:
        text = self.held + delta
        starts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if starts:
            self.held, self.stopped = "", True
            return text[:min(starts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        """What is held at the end of a reply that did not stop: it was no stop string after all."""
        held, self.held = self.held, ""
        return held
