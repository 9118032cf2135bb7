"""Hugging Face checkpoint directories: `config.json` + `model.safetensors` (or shards + index).

State-dict keys are the checkpoint's keys one to one (the module names follow Hugging Face), so
loading is: build the model on the meta device (no memory), read the tensors with safetensors,
check every name and shape, then `load_state_dict(assign=True)`. Only safetensors and JSON are
ever read: nothing is unpickled. Writes go to a temporary directory that is renamed into place,
so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .files import json_bytes, read_json, staged_dir
from .model import Transformer
from .nf4 import quantize_nf4

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_FILES = "model*.safetensors*"  # a save replaces all of these: an old shard left would be read
PathLike = Union[str, os.PathLike]
# Buffers that older transformers versions saved and now recompute: read and ignored, as transformers does.
_DERIVED_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
# A decoder layer's parts as transformers' LlamaDecoderLayer (Mistral, Qwen2 alike) registers them
_LAYER_PART = re.compile(r"(?P<layer>model\.layers\.\d+)\.(?P<part>\w+)\..+")
_LAYER_ORDER = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# The dtypes a stored weight may have: those torch's Linear computes in (not float8)
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# transformers' max_shard_size strings (huggingface_hub.parse_size_to_int: decimal units, any case, a
# number that may have a fraction) and the binary units of transformers.utils.convert_file_size_to_int
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
               "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?B)\s*", re.IGNORECASE)


def read_config(path: PathLike) -> ModelConfig:
    hf = read_json(Path(path) / "config.json", "a Hugging Face model directory needs config.json")
    return ModelConfig.from_hf_config(hf)


def _weight_files(path: Path) -> list[Path]:
    # A folder with both reads model.safetensors, as transformers does: its index is then not even opened.
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    if (path / INDEX_NAME).is_file():
        index = read_json(path / INDEX_NAME, "a sharded checkpoint lists its shards there")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX_NAME}: expected \"weight_map\", an object of tensor name -> shard file, "
                             f"got {weight_map!r}")
        files = sorted(set(weight_map.values()))
        for f in files:  # the index is downloaded data: it must not make loading read files elsewhere
            if Path(f).anchor or ".." in Path(f).parts:
                raise ValueError(f"{path / INDEX_NAME}: weight_map names a shard outside the model directory, {f!r}; "
                                 "expected a file name inside it")
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX_NAME} names shard files that are missing: {missing}")
        return [path / f for f in files]
    pickled = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}{hint}")


@contextmanager
def open_safetensors(path: PathLike) -> Iterator[Any]:
    """safe_open(path) on the CPU; a damaged file (cut short by a full disk or a killed copy) is a
    ValueError naming it, whether the header or a tensor is what fails to read, instead of the
    Rust library's SafetensorError, which names neither the file nor the likely cause."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, by name (safetensors.torch.load_file, with
    open_safetensors' error for a damaged file)."""
    with open_safetensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def read_state_dict(path: PathLike, convert: Optional[Callable[[str, torch.Tensor], Any]] = None) -> dict[str, Any]:
    """Every tensor of the checkpoint's safetensors file(s), by name; convert(name, tensor), if given,
    is applied to each as it is read, so that only one tensor as stored is in memory at a time.
    Every tensor must be floating point, as every weight of the model is (ValueError otherwise)."""
    tensors: dict[str, Any] = {}
    for f in _weight_files(Path(path)):
        with open_safetensors(f) as sf:
            for name in sf.keys():
                tensor = sf.get_tensor(name)
                if tensor.dtype not in _WEIGHT_DTYPES:
                    # transformers casts e.g. int8 to float silently (quantized codes read as weights);
                    # torch's own refusal, later, names neither file nor tensor
                    expected = ", ".join(str(d).removeprefix("torch.") for d in _WEIGHT_DTYPES)
                    raise ValueError(f"{f}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}; expected "
                                     f"a floating-point weight ({expected}): a quantized or damaged checkpoint?")
                tensors[name] = tensor if convert is None else convert(name, tensor)
    return tensors


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise one error that lists every missing name, unexpected name and shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{n}: expected {tuple(expected[n])}, found {tuple(found[n].shape)}"
              for n in sorted(set(expected) & set(found)) if tuple(expected[n]) != tuple(found[n].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{where}: " + " | ".join(problems))


def _tie_as_transformers(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Read a tied config's pair of weights as transformers 5 does (PreTrainedModel.tie_weights): a file
    with one of the two gives it to both; with both equal (an exporter's copy), the embedding. Both but
    different means the config is wrong: the model is loaded untied, with a warning, and
    cfg.tie_word_embeddings set false, so that it saves as what it is."""
    if not cfg.tie_word_embeddings or _HEAD not in tensors:
        return
    if _EMBED not in tensors:
        tensors[_EMBED] = tensors.pop(_HEAD)
    elif torch.equal(tensors[_EMBED], tensors[_HEAD]):
        del tensors[_HEAD]
    else:
        warnings.warn(f"{where}: config.json has tie_word_embeddings=true but {_HEAD} differs from {_EMBED}; "
                      "loaded untied, as transformers does (set tie_word_embeddings=false)", stacklevel=3)
        cfg.tie_word_embeddings = False


def load_pretrained(path: PathLike, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                    quantization: Optional[str] = None) -> Transformer:
    """Load a Hugging Face LLaMA / Mistral / Qwen2 directory into a `Transformer`.

    dtype: cast floating tensors to this dtype (default: as stored). quantization="nf4" stores
    every Linear but lm_head as 4-bit NF4 with double quantization (QLoRA's frozen base).
    """
    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    # Each Linear weight to quantize is quantized as it is read: the peak is the 4-bit model and one
    # weight in full precision, not the full-precision model (QLoRA's point is the memory).
    quantized = set()
    if quantization is not None:
        from .linear4bit import check_method, quantization_targets, quantize_model

        check_method(quantization)  # before any tensor is read
        quantized = {f"{name}.weight" for name, _ in quantization_targets(model)}

    def convert(name: str, stored: torch.Tensor):
        t = (stored.to(dtype) if dtype is not None and stored.is_floating_point() else stored).to(device)
        if name in quantized:
            return quantize_nf4(t, name=name)
        # When quantizing, kept tensors are copied out of the file's mapping, so that the mapping, with
        # the pages of every weight read to quantize it, goes when loading ends.
        return t.clone() if quantized and t.data_ptr() == stored.data_ptr() else t

    tensors = {k: v for k, v in read_state_dict(path, convert).items() if not _DERIVED_BUFFER.fullmatch(k)}
    _tie_as_transformers(cfg, tensors, str(path))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop(_HEAD)
    check_state_dict(expected, tensors, str(path))
    weights = {name.removesuffix(".weight"): tensors.pop(name) for name in quantized}
    model.load_state_dict(tensors, strict=False, assign=True)  # the quantized Linears' weights stay on meta
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    if quantization is not None:
        quantize_model(model, quantization, weights=weights)
    return model.eval()


def shard_size_bytes(size: Union[int, str]) -> int:
    """max_shard_size in bytes: an int, or a string as transformers' save_pretrained takes it, "5GB" =
    5·10^9 (TB, GB, MB, KB, any case, "1.5GB" too) or "5GiB" = 5·2^30 (TiB, GiB, MiB, KiB)."""
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match:
        n = int(float(match[1]) * _SIZE_UNITS[match[2].upper()])
    else:
        n = size if isinstance(size, int) and not isinstance(size, bool) else None
    if n is None or n <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected a positive number of bytes, an int or a string such as "
                         "'5GB' (10^9 bytes; also TB, MB, KB) or '5GiB' (2^30 bytes; also TiB, MiB, KiB)")
    return n


def save_pretrained(model: Transformer, path: PathLike, max_shard_size: Union[int, str] = 2 * 1024**3) -> None:
    """Write a directory that `load_pretrained` and `transformers.AutoModelForCausalLM` both read;
    max_shard_size as `shard_size_bytes` reads it."""
    from .linear4bit import Linear4bit

    max_bytes = shard_size_bytes(max_shard_size)  # before any work: a typo fails at once

    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("a 4-bit (NF4) model has no Hugging Face checkpoint form: save the 16/32-bit base it was "
                         "loaded from, or merge_and_unload() its adapter, which returns 16/32-bit layers")
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("config.tie_word_embeddings is set but lm_head.weight is not the embedding: saving would "
                         "drop lm_head; set tie_word_embeddings=False (merge_and_unload does when it unties them)")
    if not model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight:
        # safetensors refuses one tensor under two names ("Some tensors share memory"), and a file holding
        # it twice would load untied: say which setting disagrees with the model instead
        raise ValueError("lm_head.weight is the embedding (tied), but config.tie_word_embeddings is false: set "
                         "model.config.tie_word_embeddings = True to save it tied, or untie it first "
                         "(model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone()))")
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
    hf = model.config.to_hf_config()
    hf["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    shards = _split_shards(_transformers_order(state), max_bytes)
    with staged_dir(path, stale=WEIGHT_FILES) as tmp:
        (tmp / "config.json").write_bytes(json_bytes(hf))
        for name, shard in shards.items():
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:  # the index transformers 5 writes: its metadata and each tensor's file
            metadata = {"total_parameters": sum(v.numel() for v in state.values()),
                        "total_size": sum(v.nbytes for v in state.values())}
            index = {"metadata": metadata, "weight_map": {k: name for name, shard in shards.items() for k in shard}}
            (tmp / INDEX_NAME).write_bytes(json_bytes(index))


def _transformers_order(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state in the order transformers' LLaMA / Mistral / Qwen2 list their tensors, which decides
    which shard each lands in: a decoder layer's attention and MLP before its two norms (a Block here
    registers each norm before the part it feeds, in the order they run)."""
    def layer(name: str) -> str:  # "model.layers.3" for a decoder layer's tensor, else the name itself
        match = _LAYER_PART.fullmatch(name)
        return match["layer"] if match else name

    def rank(name: str) -> int:
        match = _LAYER_PART.fullmatch(name)
        return _LAYER_ORDER.index(match["part"]) if match else 0

    names = [n for _, group in groupby(state, key=layer) for n in sorted(group, key=rank)]
    return {n: state[n] for n in names}


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> dict[str, dict[str, torch.Tensor]]:
    """The weight files of `state` by file name, laid out as huggingface_hub's
    split_torch_state_dict_into_shards lays them out for transformers' save_pretrained. Tensors, in
    state order, fill the open shard until one would take it over max_bytes: that one starts the next.
    A tensor over max_bytes by itself gets a shard of its own, listed before the open shard, which goes
    on filling after it. One shard is model.safetensors, n are model-0000i-of-0000n.safetensors.
    (huggingface_hub also keeps tensors that share storage in one shard; here none do: safetensors
    refuses them, and a tied lm_head is left out before, as transformers leaves it out.)"""
    shards: list[dict[str, torch.Tensor]] = []
    open_shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in state.items():
        if t.nbytes > max_bytes:
            shards.append({name: t})
            continue
        if size + t.nbytes > max_bytes:
            shards.append(open_shard)
            open_shard, size = {}, 0
        open_shard[name] = t
        size += t.nbytes
    if open_shard:
        shards.append(open_shard)
    if len(shards) == 1:
        return {SINGLE_NAME: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}
