"""Hugging Face checkpoint directories: both directions with `transformers`, shards, and errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minipeft import Transformer, load_pretrained
from minipeft.job import load_trained
from minipeft.linear4bit import Linear4bit
from minipeft.lora import LoraConfig, LoraLinear
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.tokenizer import load_tokenizer
from minipeft.train_cli import merge_checked
from conftest import save_tiny_base, tiny_model, to_hf


def test_saved_directory_loads_in_transformers(family, tmp_path):
    import transformers
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert hf.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_transformers_directory_loads_here(family, tmp_path):
    hf = to_hf(tiny_model(family, seed=5))
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_round_trip_and_dtype(tmp_path):
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "m", max_shard_size=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), n
    # Re-saving as one file removes the stale shards and index.
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_errors_name_the_problem(tmp_path):
    model = tiny_model("llama-gqa")
    d = tmp_path / "m"
    model.save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(1)
    del tensors["model.norm.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "missing tensors: ['model.norm.weight']" in msg
    assert "unexpected tensors: ['model.extra.weight']" in msg
    assert "model.layers.0.mlp.up_proj.weight: expected (96, 64), found (3, 3)" in msg

    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_pretrained(d)
    (d / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="gpt_neox"):
        load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import minipeft.checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        tiny_model().save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_old_rotary_inv_freq_buffers_are_ignored(tmp_path):
    """Older transformers saved rotary_emb.inv_freq; transformers loads such files, so must we."""
    import transformers
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(model.config.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    save_file(tensors, tmp_path / "model.safetensors")
    ids = torch.randint(0, 131, (2, 9))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path)(ids), model(ids), atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)  # as in the parity tests above
    tensors["model.layers.0.self_attn.rotary_emb.scale"] = torch.rand(4)  # only inv_freq is known to be derived
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.self_attn.rotary_emb.scale'\]"):
        load_pretrained(tmp_path)


def test_save_into_new_parents_stages_beside_the_target(tmp_path, monkeypatch):
    """The temporary directory must sit beside the target: os.replace cannot cross filesystems (EXDEV)."""
    import minipeft.checkpoint as ckpt

    renames = []
    real = ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda src, dst: renames.append((src, dst)) or real(src, dst))
    target = tmp_path / "a" / "new" / "dir"
    tiny_model().save_pretrained(target)
    assert [(Path(s).parent, Path(d)) for s, d in renames] == [(target.parent, target)]
    assert sorted(p.name for p in target.parent.iterdir()) == ["dir"]
    assert isinstance(load_pretrained(target), Transformer)


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_save_over_a_model_that_crashes_leaves_the_old_model_whole(tmp_path, monkeypatch, crash_at):
    """Saving over an existing model (merge --output, a pretraining run) and crashing at any rename:
    the directory is still the old model, config and weights, as before. It was filled file by
    file: a crash after config.json moved in left the new config over the old shards, which
    loaded without an error and computed neither model; one while old shards were removed left
    their index naming missing files. A save that completes keeps the other files (a model card)."""
    import minipeft.checkpoint as ckpt
    from minipeft import files

    target = tmp_path / "m"
    old = tiny_model(seed=0)
    old.save_pretrained(target, max_shard_size=10_000)  # sharded: shards and their index
    (target / "README.md").write_text("card")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    new = tiny_model(seed=1, rope_theta=10000.0)  # another config, of the same shapes
    real, renames = ckpt.os.replace, []
    monkeypatch.setattr(files, "_RENAMEAT2", None)  # the two renames, where Linux's one-step swap is not offered

    def crash(src, dst):
        renames.append(dst)
        if len(renames) == crash_at:
            raise KeyboardInterrupt  # as a kill: no chance to tidy up in between
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(target)
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging directory left
    ids = torch.randint(0, 131, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(target)(ids), old(ids), atol=0, rtol=0)
    new.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(target)(ids), new(ids), atol=0, rtol=0)


def test_a_save_into_the_working_directory_stays_in_it(tmp_path, monkeypatch):
    """save_pretrained(".") over a model: the working directory cannot be swapped (renamed away,
    the process would sit in a deleted directory), so it is filled file by file, old shards removed."""
    monkeypatch.chdir(tmp_path)
    tiny_model(seed=0).save_pretrained(".", max_shard_size=10_000)
    new = tiny_model(seed=1)
    new.save_pretrained(".")
    assert Path.cwd() == tmp_path and tmp_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ids = torch.randint(0, 131, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(".")(ids), new(ids), atol=0, rtol=0)


def test_a_save_into_a_folder_of_other_work_leaves_its_subfolders_in_place(tmp_path):
    """A folder holding subfolders the save does not write (other runs, a dataset) is not swapped:
    that would relink every file of them. It is filled file by file, its subfolders untouched."""
    target = tmp_path / "work"
    tiny_model(seed=0).save_pretrained(target, max_shard_size=10_000)
    (target / "runs" / "old").mkdir(parents=True)
    (target / "runs" / "old" / "log.txt").write_text("kept")
    inode = (target / "runs").stat().st_ino
    new = tiny_model(seed=1)
    new.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "runs"]
    assert (target / "runs").stat().st_ino == inode and (target / "runs" / "old" / "log.txt").read_text() == "kept"
    ids = torch.randint(0, 131, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(target)(ids), new(ids), atol=0, rtol=0)


def test_a_saved_directory_is_fsynced_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """As files.write_atomic: without it, a power loss can persist the rename but not the data."""
    import os

    import minipeft.checkpoint as ckpt

    events, real_fsync, real_replace = [], os.fsync, ckpt.os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    target = tmp_path / "m"
    tiny_model().save_pretrained(target)
    renamed = events.index(("replace",))
    assert {("fsync", p.stat().st_ino) for p in [target, *target.iterdir()]} <= set(events[:renamed])
    assert events[renamed + 1:] == [("fsync", tmp_path.stat().st_ino)]


def test_tied_config_with_untied_weights_is_refused(tmp_path):
    model = tiny_model("qwen2")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tie_word_embeddings is set but lm_head.weight is not the embedding"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tied_weights_with_an_untied_config_are_refused_naming_the_setting(tmp_path):
    """It failed inside safetensors: "Some tensors share memory", naming neither lm_head nor the config."""
    model = tiny_model("qwen2")
    model.config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="lm_head.weight is the embedding .tied., but config.tie_word_embeddings is false"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def base_and_adapter(tmp_path):
    """A tied tiny LLaMA with a tokenizer, and an adapter that trains a copy of lm_head (which unties it)."""
    base = save_tiny_base(tmp_path / "base")
    peft_model = get_peft_model(load_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"],
                                                                  modules_to_save=["lm_head"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def test_a_qlora_adapter_merges_into_the_base_it_was_trained_on(tmp_path, capsys):
    """A QLoRA adapter's file records its NF4 base, so merge (and eval, through load_trained) load the
    base that way: the merged checkpoint computes NF4 base + adapter, the model trained and evaluated.
    Before, it loaded the float32 base: the check compared that with itself and passed, while the
    written model differed from the trained one (max logit diff 1.4 on the shipped model)."""
    base = save_tiny_base(tmp_path / "base", hidden_size=128, intermediate_size=256)  # NF4 blocks of 64
    for kind, quantization in (("qlora", "nf4"), ("lora", None)):
        model = get_peft_model(load_pretrained(base, quantization=quantization),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        model.save_pretrained(tmp_path / kind)
        assert PeftModel.saved_base_quantization(tmp_path / kind) == quantization
    trained = PeftModel.from_pretrained(load_pretrained(base, quantization="nf4"), tmp_path / "qlora").eval()
    on_float_base = PeftModel.from_pretrained(load_pretrained(base), tmp_path / "qlora").eval()
    ids = torch.tensor([load_tokenizer(base).encode("the quick brown fox", bos=True)])
    report = merge_checked(str(base), str(tmp_path / "qlora"), str(tmp_path / "merged"), max_diff=1e-3, force=False)
    assert "base loaded in NF4 (the adapter's file records it: trained with QLoRA)" in capsys.readouterr().out
    with torch.no_grad():
        merged, expected, other = load_pretrained(tmp_path / "merged")(ids), trained(ids), on_float_base(ids)
    assert report["max_abs_logit_diff"] < 1e-4 and (expected - other).abs().max() > 1e-2  # the bases differ
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    # --quantization none: the float32 base, as asked (and checked against that)
    merge_checked(str(base), str(tmp_path / "qlora"), str(tmp_path / "m32"), 1e-3, False, quantization="none")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "m32")(ids), other, atol=1e-4, rtol=0)
    lora, _ = load_trained(str(base), str(tmp_path / "lora"))  # a LoRA adapter: the base as stored
    assert not any(isinstance(m, Linear4bit) for m in lora.modules())


def test_merge_checks_the_written_checkpoint(base_and_adapter, tmp_path, monkeypatch):
    base, adapter = base_and_adapter
    out = tmp_path / "new" / "merged"  # parents that do not exist yet
    report = merge_checked(str(base), str(adapter), str(out), max_diff=1e-3, force=False)
    assert report["max_abs_logit_diff"] < 1e-5
    reference, tok = load_trained(str(base), str(adapter))
    ids = torch.tensor([tok.encode("the quick brown fox", bos=True)])
    with torch.no_grad():  # float32 merge: observed ~1e-6
        torch.testing.assert_close(load_pretrained(out)(ids), reference(ids), atol=1e-4, rtol=0)
    assert (out / "tokenizer.model").is_file()

    import minipeft.checkpoint as ckpt

    real_save = ckpt.save_file

    def lossy(tensors, *a, **k):  # a saving bug: the model in memory is right, the file is not
        real_save({k: v * 1.5 if k == "lm_head.weight" else v for k, v in tensors.items()}, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", lossy)
    with pytest.raises(ValueError, match="nothing written"):
        merge_checked(str(base), str(adapter), str(tmp_path / "bad"), max_diff=1e-3, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "base.txt", "new"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_merge_is_checked_in_float32(tmp_path, monkeypatch, capsys, dtype):
    """A 16-bit checkpoint: its logits computed in 16 bits moved by ~4e-3 on this tiny model alone, so
    every right merge was refused (> 1e-3) unless forced, which turned the check off. Both checks now
    run in float32; the rounding of W + ΔW to 16 bits is measured and reported, and a wrong merge is
    still refused."""
    base = tmp_path / "base"
    save_tiny_base(base)
    load_pretrained(base, dtype=dtype).save_pretrained(base)  # the checkpoint itself 16-bit
    peft_model = get_peft_model(load_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    report = merge_checked(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"), max_diff=1e-3, force=False)
    assert report["max_abs_logit_diff"] < 1e-5 and report["greedy_token_agreement"] == 1.0
    assert 0 < report["rounding_max_abs_logit_diff"] < 0.1  # the 16-bit weights' cost, measured
    assert "rounding max |logit diff|" in capsys.readouterr().out
    assert load_pretrained(tmp_path / "merged").model.embed_tokens.weight.dtype == dtype  # written as it came

    real_unloaded = LoraLinear.unloaded

    def broken(self):  # a merge bug: a scale applied twice
        layer = real_unloaded(self)
        layer.weight.data.mul_(1.01)
        return layer

    monkeypatch.setattr(LoraLinear, "unloaded", broken)
    with pytest.raises(ValueError, match="fails the merge check"):
        merge_checked(str(base), str(tmp_path / "adapter"), str(tmp_path / "bad"), max_diff=1e-3, force=False)


def test_a_damaged_weights_file_is_named(tmp_path):
    """A file cut short (a full disk, a killed copy) or not safetensors at all: a ValueError naming it,
    not safetensors' SafetensorError traceback, which names neither the file nor the likely cause."""
    import re

    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for damaged in (data[: len(data) // 2], data[:6], b"not a safetensors file"):
        weights.write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file (truncated or "
                                                       "corrupt?): ")):
            load_pretrained(tmp_path)


def test_saved_directories_follow_the_umask(tmp_path, monkeypatch):
    """A directory is staged with mkdtemp (mode 0700) and renamed into place: it must get a plain
    mkdir's mode, 0777 less the umask, like every other output."""
    from minipeft import files

    monkeypatch.setattr(files, "_UMASK", 0o022)  # read once at import; this umask gives 0755, not 0700
    tiny_model().save_pretrained(tmp_path / "m")
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_a_filled_folder_takes_new_subfolders_over_old_ones(tmp_path, monkeypatch):
    """Filled file by file (here the working directory), a subfolder the new contents also hold
    (a pretraining run's tensorboard/) replaces the old one; os.replace alone refused a non-empty one."""
    from minipeft.files import replace_dir, staging_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "old.events").write_text("old")
    (tmp_path / "model-00001-of-00002.safetensors").write_text("old shard")
    stage = staging_dir(tmp_path)
    (stage / "tensorboard").mkdir()
    (stage / "tensorboard" / "new.events").write_text("new")
    (stage / "model.safetensors").write_text("new")
    replace_dir(stage, tmp_path, stale="model*.safetensors*")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "model.safetensors", "tensorboard", "tensorboard/new.events"]


def test_a_damaged_shard_index_is_named(tmp_path):
    """model.safetensors.index.json cut short, or without its weight_map: a ValueError naming the file
    (and line, or field), not json's bare JSONDecodeError or a KeyError 'weight_map'."""
    import re

    tiny_model().save_pretrained(tmp_path, max_shard_size=20_000)
    index = tmp_path / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{index}: invalid JSON at line ")):
        load_pretrained(tmp_path)
    index.write_text(json.dumps({"metadata": json.loads(text)["metadata"]}))
    with pytest.raises(ValueError, match=re.escape(f"{index}: expected \"weight_map\", an object of tensor name -> "
                                                   "shard file, got None")):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("lm_head", ["different", "a copy", "alone"])
def test_a_tied_config_reads_the_pair_of_weights_as_transformers_does(tmp_path, lm_head):
    """tie_word_embeddings=true, and the file holds lm_head.weight: transformers 5 ties to the copy of the
    embedding, and takes a different lm_head as the config being wrong, untying (with a warning); a file with
    lm_head.weight alone ties the embedding to it. Dropping a different lm_head moved logits by ~30."""
    import warnings

    import transformers
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = {"different": torch.randn_like(embed), "a copy": embed.clone(),
                                 "alone": embed}[lm_head]
    if lm_head == "alone":
        del tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_pretrained(tmp_path)
    untied = lm_head == "different"
    assert [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)] == (
        [f"{tmp_path}: config.json has tie_word_embeddings=true but lm_head.weight differs from "
         "model.embed_tokens.weight; loaded untied, as transformers does (set tie_word_embeddings=false)"]
        if untied else [])
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (not untied) == ours.config.tie_word_embeddings
    assert ref.lm_head.weight is ref.model.embed_tokens.weight or untied
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)  # float32, as the parity tests
        ours.save_pretrained(tmp_path / "again")  # an untied model saves as one, with both weights
        torch.testing.assert_close(load_pretrained(tmp_path / "again")(ids), ours(ids), atol=0, rtol=0)


@pytest.mark.parametrize("escape", ["../outside/model-00001.safetensors", "/abs/model-00001.safetensors"])
def test_a_shard_index_naming_a_file_outside_the_directory_is_refused(tmp_path, escape):
    """A downloaded index is data: one whose shard names leave the directory (an absolute path, or "..")
    would make loading read whatever safetensors file they name. transformers refuses it; so do we, even
    when that file exists."""
    import re
    import shutil

    import transformers
    model_dir = tmp_path / "m"
    tiny_model().save_pretrained(model_dir, max_shard_size=20_000)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = index["weight_map"]["model.embed_tokens.weight"]
    target = tmp_path / "outside" / "model-00001.safetensors" if escape.startswith("..") else Path(escape)
    if escape.startswith(".."):
        target.parent.mkdir()
        shutil.copy(model_dir / first, target)
    index["weight_map"] = {k: escape if v == first else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="points outside the model directory"):
        transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=re.escape(f"{index_path}: weight_map names a shard outside the model "
                                                   f"directory, {escape!r}; expected a file name inside it")):
        load_pretrained(model_dir)
