"""User mistakes with the PeftModel API, against Hugging Face PEFT 0.22 on the same tiny model: where PEFT
has a behaviour it is matched; where PEFT fails with an unrelated error or goes on silently, minipeft refuses
naming the argument or file and what it expected."""
import json
import shutil
import warnings

import pytest
import torch

import peft
from safetensors.torch import load_file

from minipeft.lora import LoraConfig
from minipeft.peft_model import WEIGHTS_NAME, PeftModel, get_peft_model
from minipeft.tuner_layer import TunerLayer
from conftest import tiny_model, to_hf

CFG = dict(r=2, target_modules=["q_proj", "v_proj"])


def test_get_peft_model_twice_on_one_base_is_refused_where_peft_mixes_the_two():
    """PEFT warns and goes on: the second config's LoRA replaces the first's on q_proj, the first's stays on
    v_proj, which the second config does not name (a model neither config describes). minipeft refuses."""
    hf = to_hf(tiny_model())
    peft.get_peft_model(hf, peft.LoraConfig(**CFG))
    with pytest.warns(UserWarning, match="modify a model with PEFT for a second time"):
        second = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert "default" in second.base_model.model.model.layers[0].self_attn.v_proj.lora_A  # the stale one
    base = tiny_model()
    first = get_peft_model(base, LoraConfig(**CFG))
    with pytest.raises(ValueError, match=r"model already holds adapters \(model.layers.0.self_attn.q_proj, ... 4 "
                                         r"wrapped modules\).*add_adapter\(\) on that PeftModel"):
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="model is a PeftModel already"):
        get_peft_model(first, LoraConfig(r=4, target_modules=["q_proj"]))
    assert first.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (2, 64)  # untouched
    assert first.get_nb_trainable_parameters()[0] > 0  # its adapter still trains
    get_peft_model(first.unload(), LoraConfig(r=4, target_modules=["q_proj"]))  # the bare base: fine


def _adapter_dir(tmp_path):
    get_peft_model(tiny_model(), LoraConfig(**CFG)).save_pretrained(tmp_path / "good")
    return tmp_path / "good"


@pytest.mark.parametrize("given", [WEIGHTS_NAME, "adapter_config.json"])
def test_from_pretrained_given_a_file_names_the_folder_expected(tmp_path, given):
    """PEFT: "Can't find 'adapter_config.json' at '<file>'"; minipeft looked for <file>/adapter_config.json."""
    good = _adapter_dir(tmp_path)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        peft.PeftModel.from_pretrained(to_hf(tiny_model()), str(good / given))
    base = tiny_model()
    with pytest.raises(ValueError, match=rf"{given}: is a file; expected the adapter directory .* \(here: {good}\)"):
        PeftModel.from_pretrained(base, good / given)
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        PeftModel.from_pretrained(base, tmp_path / "nope")
    model = get_peft_model(base, LoraConfig(**CFG))
    with pytest.raises(ValueError, match="is a file; expected the adapter directory"):
        model.load_adapter(good / given, "other")
    assert list(model.peft_config) == ["default"]


def test_a_pickle_adapter_is_refused_naming_the_file_where_peft_loads_it(tmp_path):
    """An adapter folder with adapter_model.bin only: PEFT unpickles it, minipeft loads no pickle."""
    good = _adapter_dir(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    torch.save(load_file(good / WEIGHTS_NAME), pickled / "adapter_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(to_hf(tiny_model()), str(pickled))  # loads
    base = tiny_model()
    with pytest.raises(FileNotFoundError, match=r"pickled/adapter_model.safetensors: missing; found \S+/pickled/"
                                                r"adapter_model.bin: a pickle file, never loaded \(unpickling can run"):
        PeftModel.from_pretrained(base, pickled)
    assert not any(isinstance(m, TunerLayer) for m in base.modules())


def test_an_adapter_config_that_is_not_an_object_is_named(tmp_path):
    """PEFT: "TypeError: list indices must be integers"; minipeft: AttributeError 'list' has no 'get'."""
    good = _adapter_dir(tmp_path)
    (good / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"good/adapter_config.json: expected a JSON object of config fields, "
                                         "got list"):
        PeftModel.from_pretrained(tiny_model(), good)


@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter"])
def test_an_adapter_name_that_is_not_a_str_is_named(call):
    """PEFT's set_adapter: a TypeError saying one name at a time; delete_adapter: unhashable 'list'."""
    ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(**CFG))
    with pytest.raises(TypeError):
        getattr(ref, call)(["default"])
    ours = get_peft_model(tiny_model(), LoraConfig(**CFG))
    with pytest.raises(TypeError, match=r"adapter name must be a str, got \['default'\]; adapters: \['default'\]"):
        getattr(ours, call)(["default"])


@pytest.mark.parametrize("config", [dict(r=2), LoraConfig, peft.LoraConfig(r=2, target_modules=["q_proj"])])
def test_a_config_that_is_not_a_minipeft_config_instance_is_named(config):
    """PEFT fails inside (AttributeError on a dict, KeyError on a class); minipeft: 'no check_model'."""
    base = tiny_model()
    with pytest.raises(TypeError, match="config must be a minipeft config instance"):
        get_peft_model(base, config)
    assert not any(isinstance(m, TunerLayer) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())  # given back as it was


def test_after_the_last_adapter_is_deleted_running_or_saving_says_so(tmp_path):
    """As PEFT, deleting the last adapter is allowed and the model then runs nothing (PEFT: KeyError
    'default' on forward and save_pretrained; minipeft saved nothing, silently). Adding one works again."""
    ids = torch.randint(0, 131, (1, 5))
    ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(**CFG))
    ours = get_peft_model(tiny_model(), LoraConfig(**CFG))
    ref.delete_adapter("default")
    ours.delete_adapter("default")
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    with pytest.raises(KeyError):
        ref(ids)
    with pytest.raises(ValueError, match="no adapter named 'default': it was deleted, and with it the last adapter"):
        ours(ids)
    with pytest.raises(ValueError, match="no adapter to save: every adapter was deleted"):
        ours.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ours.add_adapter("n", LoraConfig(**CFG)), ref.add_adapter("n", peft.LoraConfig(**CFG))
    ours.set_adapter("n"), ref.set_adapter("n")
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_save_pretrained_into_a_file_or_with_a_str_of_adapters_is_refused_as_peft(tmp_path):
    """PEFT: "should be a directory, not a file"; minipeft: a bare NotADirectoryError from its staging.
    selected_adapters="default": PEFT refuses; minipeft read it as the adapters 'd', 'e', 'f', ..."""
    ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(**CFG))
    ours = get_peft_model(tiny_model(), LoraConfig(**CFG))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        ref.save_pretrained(str(tmp_path / "afile"))
    with pytest.raises(ValueError, match="afile: is a file; save_pretrained writes a directory"):
        ours.save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):
        ref.save_pretrained(str(tmp_path / "r"), selected_adapters="default")
    with pytest.raises(TypeError, match=r"selected_adapters must be a list of adapter names, got 'default'; "
                                        r"write \['default'\]"):
        ours.save_pretrained(tmp_path / "o", selected_adapters="default")


def test_a_modules_to_save_name_matching_nothing_warns_and_trains_as_peft():
    """PEFT silently saves nothing for it (a typo trains nothing extra); minipeft warns, same model."""
    cfg = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_haed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(**cfg))
    with pytest.warns(UserWarning, match="modules_to_save entry 'lm_haed' names no module of the model"):
        ours = get_peft_model(tiny_model(), LoraConfig(**cfg))
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_a_config_file_of_another_peft_type_is_refused_naming_the_field(tmp_path):
    """A LoRA folder whose config says PREFIX_TUNING: PEFT fails in torch.empty (num_virtual_tokens None)."""
    good = _adapter_dir(tmp_path)
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError):
            peft.PeftModel.from_pretrained(to_hf(tiny_model()), str(good))
        with pytest.raises(ValueError, match="adapter_config.json: PrefixTuningConfig: num_virtual_tokens must be"):
            PeftModel.from_pretrained(tiny_model(), good)
