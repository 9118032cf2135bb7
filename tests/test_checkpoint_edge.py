"""Checkpoint directories at their edges, each as transformers 5 reads or writes them: max_shard_size
strings and the shards they give, a folder with both a single file and a shard index, weights of an
integer dtype."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipeft import load_pretrained
from minipeft.checkpoint import _split_shards, shard_size_bytes
from conftest import tiny_model, to_hf


@pytest.mark.parametrize("size", ["5GB", "500MB", "100KB", "1TB", "5gb", "5 GB", "1.5GB", "0.02MB"])
def test_decimal_shard_sizes_are_read_as_transformers_save_pretrained_reads_them(size):
    from huggingface_hub.serialization._base import parse_size_to_int  # what transformers' save_pretrained calls
    assert shard_size_bytes(size) == parse_size_to_int(size)


@pytest.mark.parametrize("size", ["5GiB", "500MiB", "100KiB"])
def test_binary_shard_sizes_are_read_as_transformers_reads_them(size):
    from transformers.utils.hub import convert_file_size_to_int
    assert shard_size_bytes(size) == convert_file_size_to_int(size)
    assert shard_size_bytes("5GiB") == 5 * 2**30 and shard_size_bytes(20_000) == 20_000


def test_a_size_string_shards_as_its_number_of_bytes_and_loads_in_transformers(tmp_path):
    """save_pretrained(max_shard_size="20KB") raised a TypeError (a str compared with an int)."""
    import transformers
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    model.save_pretrained(tmp_path / "n", max_shard_size=20_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index == json.loads((tmp_path / "n" / "model.safetensors.index.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", ["5XB", "GB", "5", "five GB", "5GBs", "-1KB", "0MB", 0, -5, True, 2.5e9, None])
def test_a_size_that_is_no_size_is_refused_naming_it_and_the_forms(size, tmp_path):
    message = re.escape(f"max_shard_size={size!r}: expected a positive number of bytes, an int or a string such "
                        "as '5GB' (10^9 bytes; also TB, MB, KB) or '5GiB' (2^30 bytes; also TiB, MiB, KiB)")
    with pytest.raises(ValueError, match=message):
        tiny_model().save_pretrained(tmp_path / "m", max_shard_size=size)
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_a_folder_with_both_a_single_file_and_an_index_reads_the_single_file_as_transformers_does(tmp_path):
    """Left by a tool that wrote one format beside the other: transformers reads model.safetensors and
    never opens the index; minipeft read the shards, another model, without a word."""
    import transformers
    single, sharded = tiny_model(seed=0), tiny_model(seed=1)
    d = tmp_path / "m"
    sharded.save_pretrained(d, max_shard_size=20_000)
    single.save_pretrained(tmp_path / "one")
    (d / "model.safetensors").write_bytes((tmp_path / "one" / "model.safetensors").read_bytes())
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()(ids).logits
        torch.testing.assert_close(ref, single(ids), atol=1e-4, rtol=0)  # transformers took the single file
        torch.testing.assert_close(load_pretrained(d)(ids), ref, atol=1e-4, rtol=0)
    (d / "model.safetensors.index.json").write_text("{")  # never opened, as in transformers
    load_pretrained(d)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool])
def test_a_weight_of_an_integer_dtype_is_refused_naming_file_tensor_and_dtype(tmp_path, dtype):
    """An int8 weight (a quantized checkpoint's codes, or a bad conversion) failed deep in torch's
    load_state_dict ("Only Tensors of floating point ... can require gradients"), naming neither the
    file nor the tensor; transformers casts it to float, reading the codes as weights."""
    tiny_model().save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].mul(100).to(dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    stored = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=re.escape(f"{shard}: tensor {name!r} is {stored}; expected a floating-point "
                                                   "weight (float32, float16, bfloat16, float64)")):
        load_pretrained(tmp_path)


def _weight_layout(folder) -> tuple[dict[str, list[str]], dict]:
    """A checkpoint folder's weight files, each with the tensors it holds, and its index (none: {})."""
    files = {p.name: sorted(load_file(p)) for p in sorted(folder.glob("model*.safetensors"))}
    index = folder / "model.safetensors.index.json"
    return files, json.loads(index.read_text()) if index.exists() else {}


# 10_000: most weights alone over the limit, each in a shard of its own; the embedding's own size: a tensor exactly
# at the limit fills a shard; 20KB: a size string; 10**9: one file.
@pytest.mark.parametrize("limit", [10_000, "embedding", "20KB", 10**9])
def test_shards_and_index_are_those_transformers_save_pretrained_writes(family, limit, tmp_path):
    """Were different: a weight over max_shard_size closed the open shard, and the tensor after it began a
    new one (huggingface_hub puts it in a shard of its own and keeps the open shard filling), a decoder
    layer's norms came first (transformers lists them after attention and MLP), and the index lacked
    total_parameters. qwen2 is the tied case: lm_head is in neither."""
    import transformers
    model = tiny_model(family)
    if limit == "embedding":
        limit = model.model.embed_tokens.weight.nbytes
    model.save_pretrained(tmp_path / "ours", max_shard_size=limit)
    to_hf(model).save_pretrained(tmp_path / "hf", max_shard_size=limit)
    ours, theirs = _weight_layout(tmp_path / "ours"), _weight_layout(tmp_path / "hf")
    assert ours == theirs
    if limit == 10**9:
        assert list(ours[0]) == ["model.safetensors"]
    else:
        assert len(ours[0]) > 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sizes, limit", [
    ([6, 6, 2, 6, 2, 2], 10),  # huggingface_hub's own example: [6], [6+2], [6+2+2]
    ([2, 20, 3], 10),          # one over the limit in the middle: alone, and 2 and 3 still share a shard
    ([20, 1, 30, 2, 40], 10),  # over the limit first, between and last
    ([10, 10, 5, 5, 10], 10),  # exactly at the limit: a tensor, and two that sum to it
    ([3, 4], 10),              # one file
    ([11], 10),                # one tensor, over the limit: one file
])
def test_split_follows_huggingface_hub(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards
    state = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    ours = {name: list(shard) for name, shard in _split_shards(state, limit).items()}
    assert ours == split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors
