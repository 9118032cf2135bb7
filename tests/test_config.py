"""Presets and the Hugging Face config round trip; TrainConfig's checks of a job file."""
import re

import pytest
import torch
import yaml

from minipeft import PRESETS, ModelConfig, Transformer
from minipeft.peft_model import full_finetune
from minipeft.train_config import TrainConfig
from minipeft.trainer import Trainer
from conftest import tiny_model


@pytest.mark.parametrize("name,expected", [
    ("llama-2-7b", 6_738_415_616),
    ("qwen2-0.5b", 494_032_768),  # tied embeddings counted once
    ("tinyllama-1.1b", 1_100_048_384),
    ("llama-3.2-1b", 1_235_814_400),  # the 1.24B of its model card, tied embeddings counted once
])
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_round_trips(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())  # no memory allocated
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_agree_with_transformers_config(name):
    import transformers
    cfg = ModelConfig.from_preset(name)
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hf)
        ours = Transformer(cfg)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        ModelConfig.from_hf_config({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(KeyError, match="available"):
        ModelConfig.from_preset("llama-9")


def _hf_view(cfg) -> dict:
    """The fields of ModelConfig as a transformers config object holds them (None where it has no such field:
    LlamaConfig has no sliding_window, Qwen2Config no head_dim and no attention_bias)."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
             "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")
    view = {n: getattr(cfg, n, None) for n in names}
    rope = getattr(cfg, "rope_parameters", None)
    view["rope_theta"] = rope["rope_theta"] if rope is not None else cfg.rope_theta
    return view


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_fields_config_json_leaves_out_take_transformers_defaults(model_type):
    """A config.json written by hand or another tool may leave fields out; each then means what
    transformers' class for that model_type defaults it to (LlamaConfig's rms_norm_eps is 1e-6, and
    MistralConfig's sliding_window 4096), not what ModelConfig's constructor defaults it to."""
    import transformers
    assert _hf_view(ModelConfig.from_hf_config({"model_type": model_type})) == _hf_view(
        transformers.AutoConfig.for_model(model_type=model_type))


def test_a_config_json_without_rms_norm_eps_gives_transformers_logits(tmp_path):
    import json

    import transformers
    from conftest import to_hf
    from minipeft import load_pretrained
    model = tiny_model("llama-gqa")
    with torch.no_grad():  # embeddings of mean square ~1e-6, so eps 1e-6 against 1e-5 shows in every layer
        model.model.embed_tokens.weight.normal_(std=1e-3)
    to_hf(model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rms_norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        # the same float32 model as the parity tests (~2e-7 apart); eps 1e-5 instead of 1e-6 moved them by ~0.15
        torch.testing.assert_close(load_pretrained(tmp_path)(ids), ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, key, value", [
    ("llama-gqa", "sliding_window", 4),  # LlamaForCausalLM has no window: every query sees all its past
    ("mistral", "attention_bias", True),  # MistralForCausalLM has no biases, whatever config.json says
    ("qwen2", "attention_bias", False),  # Qwen2ForCausalLM always has q/k/v biases
])
def test_a_config_json_key_its_family_ignores_is_ignored_as_transformers_does(tmp_path, family, key, value):
    import json

    import transformers
    from conftest import to_hf
    from minipeft import load_pretrained
    to_hf(tiny_model(family)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 131, (2, 11))  # longer than the window of 4
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path)(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_every_hidden_act_transformers_computes_as_silu_is_accepted_and_no_other():
    """config.json's "swish" was refused, though transformers' ACT2FN maps it to SiLU as it does "silu"."""
    from transformers.activations import ACT2FN
    x = torch.linspace(-6, 6, 101)
    silu = {name for name in ACT2FN if torch.allclose(ACT2FN[name](x), torch.nn.functional.silu(x))}
    assert silu == {"silu", "swish"}
    for name in ACT2FN:
        if name in silu:
            ModelConfig.from_hf_config({"model_type": "llama", "hidden_act": name})
        else:
            with pytest.raises(ValueError, match=f"config.json: hidden_act {name!r} is not supported"):
                ModelConfig.from_hf_config({"model_type": "llama", "hidden_act": name})


def test_a_swish_config_json_gives_transformers_logits(tmp_path):
    import json

    import transformers
    from conftest import to_hf
    from minipeft import load_pretrained
    to_hf(tiny_model("qwen2")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ref.config.hidden_act == "swish"
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path)(ids), ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value", [
    ("bos_token_id", [1]), ("bos_token_id", [1, 2]), ("bos_token_id", "1"), ("bos_token_id", True),
    ("bos_token_id", 1.0), ("pad_token_id", [0]), ("eos_token_id", "2"), ("eos_token_id", [2, "3"]),
])
def test_a_token_id_of_a_type_transformers_refuses_is_refused_naming_the_field(field, value):
    """A list bos_token_id passed config.json and broke later, in torch.full (exercises.induction_accuracy,
    which opens each probe with bos). transformers' config classes refuse it: only eos may be a list."""
    import transformers
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    with pytest.raises(StrictDataclassFieldValidationError, match=field):
        transformers.LlamaConfig(**{field: value})
    with pytest.raises(ValueError, match=re.escape(f"config.json: {field} must be ") + ".*" + re.escape(f"got {value!r}")):
        ModelConfig.from_hf_config({"model_type": "llama", field: value})


def test_a_list_of_eos_ids_is_kept_as_transformers_keeps_it():
    import transformers
    hf = {"model_type": "llama", "bos_token_id": 1, "eos_token_id": [2, 7]}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.eos_token_id == transformers.LlamaConfig(**hf).eos_token_id == [2, 7]
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("model_type, field, value", [
    ("llama", "sliding_window", 5), ("qwen2", "sliding_window", 5),
    ("mistral", "attention_bias", True), ("qwen2", "attention_bias", False),
])
def test_a_config_its_family_cannot_express_is_refused(model_type, field, value):
    """Saved, such a model would not be the model: config.json could not say it (a llama window, a
    biased mistral), or would say what transformers and load_pretrained refuse (a qwen2 window)."""
    from minipeft.config import FAMILY_FIXED
    with pytest.raises(ValueError, match=f"model_type {model_type!r}: {field} must be "):
        ModelConfig(**{**FAMILY_FIXED[model_type], "model_type": model_type, field: value})  # the other fields fit


# --- TrainConfig: a job file's types and ranges ---------------------------------------------------
@pytest.mark.parametrize("settings,message", [
    ({"bf16": "false"}, "bf16='false' (expected true or false)"),  # a non-empty string would be truthy
    ({"gradient_checkpointing": "no"}, "gradient_checkpointing='no' (expected true or false)"),
    ({"batch_size": 2.5}, "batch_size=2.5 (expected an integer)"),
    ({"n_epochs": 1.5}, "n_epochs=1.5 (expected an integer)"),
    ({"n_epochs": True}, "n_epochs=True (expected an integer)"),  # bool is an int subclass in Python
    ({"n_epochs": "three"}, "n_epochs='three' (expected an integer)"),
    ({"logging_steps": None}, "logging_steps=None (expected an integer)"),
    ({"learning_rate": "fast"}, "learning_rate='fast' (expected a finite number)"),
    ({"learning_rate": float("nan")}, "learning_rate=nan (expected a finite number)"),
    ({"max_grad_norm": "inf"}, "max_grad_norm='inf' (expected a finite number)"),
    ({"test_file": 3}, "test_file=3 (expected a string or null)"),
    ({"lora_alpha": -4}, "lora_alpha=-4.0 (expected > 0"),
    ({"lora_alpha": 0}, "lora_alpha=0.0 (expected > 0"),  # scale 0: the LoRA update is zero, training a no-op
    ({"method": "prefix", "gradient_checkpointing": True}, "gradient_checkpointing=True (expected false with "
                                                            "method='prefix'"),
    ({"method": "prompt", "packing": True}, "packing=True (expected false with method='prefix' or 'prompt'"),
    ({"method": "prefix", "packing": True}, "packing=True (expected false with method='prefix' or 'prompt'"),
    ({"device": "gpu"}, "device='gpu' (expected 'auto', 'cpu', 'cuda' or 'cuda:N')"),
    # torch.manual_seed takes 64 bits: a larger seed failed in it with "Overflow when unpacking long long"
    ({"seed": 99999999999999999999}, "seed=99999999999999999999 (expected in [0, 9223372036854775807])"),
    ({"seed": -1}, "seed=-1 (expected in [0, 9223372036854775807])"),
])
def test_train_config_checks_every_type_and_names_the_key(settings, message):
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict(settings, where="job.json")
    assert str(e.value).startswith("job.json: invalid training config: " + message)


def test_integral_numbers_are_integers():
    """YAML and JSON write 1e3 as a float and quoted numbers as text: integral ones are the integer."""
    cfg = TrainConfig.from_dict({"max_steps": 1e3, "batch_size": 8.0, "seed": "42"})
    assert (cfg.max_steps, cfg.batch_size, cfg.seed) == (1000, 8, 42)
    assert all(type(v) is int for v in (cfg.max_steps, cfg.batch_size, cfg.seed))
    # 2**63 - 1: the largest seed torch takes (2**64 + 1 here before; now out of range, refused by name)
    assert TrainConfig(seed=2**53 + 1).seed == 2**53 + 1 and TrainConfig(seed=str(2**63 - 1)).seed == 2**63 - 1


def test_train_config_reports_every_bad_type_at_once():
    with pytest.raises(ValueError, match=r"seed='x' \(expected an integer\); bf16=1 \(expected true or false\)"):
        TrainConfig.from_dict({"bf16": 1, "seed": "x"})
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj', 1\] \(expected .*a list of strings"):
        TrainConfig.from_dict({"target_modules": ["q_proj", 1]})


def test_numbers_are_read_as_their_key_takes_them():
    cfg = TrainConfig.from_dict({"learning_rate": "2e-4", "lora_alpha": 16, "warmup_ratio": 0, "bf16": True,
                                 "target_modules": "all-linear", "test_file": None})
    assert cfg.learning_rate == 2e-4 and type(cfg.learning_rate) is float
    assert type(cfg.lora_alpha) is float and type(cfg.warmup_ratio) is float and cfg.bf16 is True
    assert (cfg.target_modules, cfg.test_file) == ("all-linear", None)


def test_yaml_job_file_with_an_exponent_float(tmp_path):
    """PyYAML reads YAML 1.1, where 2e-4 (no dot) is a string: the key takes it as the float it means."""
    text = "learning_rate: 2e-4\nweight_decay: 1e-2\nn_epochs: 2\nbf16: false\n"
    assert yaml.safe_load(text)["learning_rate"] == "2e-4"
    (tmp_path / "job.yaml").write_text(text)
    cfg = TrainConfig.load(tmp_path / "job.yaml")
    assert (cfg.learning_rate, cfg.weight_decay, cfg.n_epochs, cfg.bf16) == (2e-4, 1e-2, 2, False)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    (tmp_path / "job.yml").write_text("n_epochs: 2\ntarget_modules: [q_proj, v_proj\nbatch_size: 4\n")
    with pytest.raises(ValueError, match=r"job.yml: invalid YAML at line 3 column 11: expected ',' or ']'"):
        TrainConfig.load(tmp_path / "job.yml")


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML and JSON parsers keep the last of two values silently: the job would train with
    learning_rate 0.5, or batch_size 2, where the reader of the file saw the first value."""
    (tmp_path / "job.yaml").write_text("learning_rate: 1e-4\nbatch_size: 4\nlearning_rate: 0.5\n")
    with pytest.raises(ValueError, match=r"job.yaml: invalid YAML at line 3 column 1: key 'learning_rate' given "
                                         r"twice \(first at line 1\); keep one"):
        TrainConfig.load(tmp_path / "job.yaml")
    (tmp_path / "job.json").write_text('{"batch_size": 4, "seed": 1, "batch_size": 2}')
    with pytest.raises(ValueError, match=r"job.json: key 'batch_size' given twice; keep one"):
        TrainConfig.load(tmp_path / "job.json")
    # Still YAML as safe_load reads it: merge keys may override what they merge; tags are refused.
    from minipeft.train_config import _UniqueKeyLoader

    text = "defaults: &d {lora_rank: 4}\nlora: {<<: *d, lora_rank: 8}\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == {"defaults": {"lora_rank": 4}, "lora": {"lora_rank": 8}}
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        yaml.load("seed: !!python/object:os.system 1\n", Loader=_UniqueKeyLoader)


def test_a_directory_is_not_a_job_file(tmp_path):
    for name in ("jobs", "jobs.yaml"):
        (tmp_path / name).mkdir()
        with pytest.raises(ValueError, match=f"{name}: is a directory; expected a JSON or YAML job file"):
            TrainConfig.load(tmp_path / name)


def test_full_fine_tuning_in_bf16_is_refused_because_its_updates_round_away(tmp_path):
    """The trainer steps weights in their own dtype, with no float32 master copy. The float32 run is
    the reference: 3 AdamW steps at lr 2e-5 move every RMSNorm gain; in bf16 (spacing 2^-7 near 1)
    the same ~2e-5 steps round to nothing. Hence the refusal, which PEFT methods (their trained
    weights stay float32) do not need."""
    torch.manual_seed(0)
    data = [(ids, ids) for ids in torch.randint(0, 131, (12, 10)).tolist()]
    cfg = TrainConfig(output_dir=str(tmp_path), method="full", batch_size=4, learning_rate=2e-5,
                      lr_scheduler_type="constant", save_strategy="no", disable_tqdm=True)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = full_finetune(tiny_model())
        trainer = Trainer(cfg, model, data)
        model.to(dtype)  # in place, past the Trainer's own refusal of 16-bit trainable weights (the same reason)
        norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
        for step in range(3):
            trainer.train_step(list(range(4 * step, 4 * step + 4)))
        params = dict(model.named_parameters())
        changed = sum(int((params[n] != before).sum()) for n, before in norms.items())
        moved[dtype] = changed / sum(before.numel() for before in norms.values())
    assert moved == {torch.float32: 1.0, torch.bfloat16: 0.0}
    with pytest.raises(ValueError, match=r"bf16=True \(expected false with method='full'.*use bf16=false, or a PEFT"):
        TrainConfig(method="full", bf16=True)
    assert TrainConfig(method="lora", bf16=True).bf16


def test_yaml_save_strategy_no_is_the_string_no(tmp_path):
    """YAML 1.1 (PyYAML) reads the README's `save_strategy: no` as false: it was refused as
    "save_strategy=False (expected a string)", though "no" is the documented (and HF's) value."""
    (tmp_path / "job.yaml").write_text("save_strategy: no\n")
    assert TrainConfig.load(tmp_path / "job.yaml").save_strategy == "no"
    with pytest.raises(ValueError, match=r"save_strategy=True \(expected a string\)"):  # `yes` means nothing here
        TrainConfig.from_dict({"save_strategy": True})


@pytest.mark.parametrize("text", ["+-5", "²", "--1"])
def test_text_that_is_no_integer_is_refused_by_name(text):
    """str.isdigit() takes "²" and the check stripped every sign, so int() failed on these with
    Python's own "invalid literal for int()", naming no key."""
    with pytest.raises(ValueError, match=re.escape(f"seed={text!r} (expected an integer)")):
        TrainConfig.from_dict({"seed": text})
    assert TrainConfig.from_dict({"seed": " +7 "}).seed == 7
