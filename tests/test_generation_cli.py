"""`minipeft generate`'s argument checks: each refused before the weights load, with one line
naming the flag and what was expected."""
import pytest

from minipeft.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    import minipeft.generate_cli

    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the error")

    monkeypatch.setattr(minipeft.generate_cli, "load_pretrained", load)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_temperature_that_is_not_a_finite_number_at_or_above_0_is_refused_by_argparse(capsys, no_model_load, value):
    """-1 and nan were refused by generate() only after the model had loaded; inf sampled uniformly."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ids", "1,2", "--temperature", value])
    assert e.value.code == 2
    assert f"argument --temperature: must be a finite number >= 0, got {value}" in capsys.readouterr().err


def test_a_prompt_that_fills_the_context_says_so(capsys, no_model_load):
    """It said "use at most 0" of --max-new-tokens, which must be >= 1."""
    from minipeft.checkpoint import read_config
    from minipeft.job import DEFAULT_MODEL

    context = read_config(DEFAULT_MODEL).max_position_embeddings
    for n in (context, context + 5):
        assert main(["generate", "--ids", ",".join(["1"] * n), "--max-new-tokens", "1"]) == 2
        err = capsys.readouterr().err
        assert err == (f"minipeft generate: error: --ids: the prompt ({n} tokens) fills the model's context of "
                       f"{context} tokens: nothing can be generated after it\n")


# --- the prompt's special tokens and the stop ids, as transformers reads the model folder ---------------
def model_folder(tmp_path, tokenizer_config=None, generation_config=None):
    """A copy of the shipped model's folder (weights and tokenizer.model linked) with its
    tokenizer_config.json changed by `tokenizer_config` (a key set to None is removed) and its
    generation_config.json replaced by `generation_config` ("absent": removed)."""
    import json
    from minipeft.job import DEFAULT_MODEL

    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.model", "special_tokens_map.json"):
        (folder / f).symlink_to((DEFAULT_MODEL / f).resolve())
    cfg = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    for key, value in (tokenizer_config or {}).items():
        cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if generation_config != "absent":
        gen = generation_config or json.loads((DEFAULT_MODEL / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


@pytest.fixture
def recorded(monkeypatch):
    """What `minipeft generate` hands to model.generate (the prompt ids, the stop ids); no weights load."""
    import minipeft.generate_cli

    calls = {}

    class Model:
        def generate(self, ids, n, eos_token_id=None, **kwargs):
            calls.update(ids=ids[0].tolist(), eos=eos_token_id)
            return ids

    monkeypatch.setattr(minipeft.generate_cli, "load_pretrained", lambda *a, **k: Model())
    return calls


@pytest.mark.parametrize("config", [{"add_bos_token": True}, {"add_bos_token": False}, {"add_bos_token": None},
                                    {"add_bos_token": True, "add_eos_token": True}])
def test_the_prompt_has_the_special_tokens_transformers_tokenizer_gives_it(tmp_path, recorded, config):
    """bos was always added; transformers' tokenizer (and so its text-generation pipeline) follows
    tokenizer_config.json: add_bos_token false, or absent (transformers 5.x), adds none."""
    import transformers

    folder = model_folder(tmp_path, tokenizer_config=config)
    prompt = "The function returns the"
    assert main(["generate", "--model", str(folder), "--prompt", prompt, "--device", "cpu"]) == 0
    assert recorded["ids"] == transformers.AutoTokenizer.from_pretrained(folder)(prompt).input_ids
    assert (recorded["ids"][0] == 1) == bool(config["add_bos_token"])


@pytest.mark.parametrize("generation_config", [{"eos_token_id": [2, 5]}, {"eos_token_id": 7}, "absent"])
def test_generation_stops_at_the_eos_ids_transformers_generate_stops_at(tmp_path, recorded, generation_config):
    """The stop id was config.json's eos_token_id whatever generation_config.json said; transformers' generate
    stops at any of generation_config.json's eos ids, or at config.json's when the file is absent."""
    import transformers

    folder = model_folder(tmp_path, generation_config=generation_config)
    assert main(["generate", "--model", str(folder), "--ids", "1,2,3", "--device", "cpu"]) == 0
    expected = transformers.AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id
    assert recorded["eos"] == (expected if isinstance(expected, list) else [expected])


@pytest.mark.parametrize("value", [[], [2, 9999], "2", True])
def test_a_bad_eos_token_id_in_generation_config_is_named(tmp_path, capsys, no_model_load, value):
    folder = model_folder(tmp_path, generation_config={"eos_token_id": value})
    assert main(["generate", "--model", str(folder), "--ids", "1,2,3"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'generation_config.json'}: eos_token_id must be a token id or a non-empty list" in err
    assert "[0, 4096)" in err


def test_a_bad_add_bos_token_is_named(tmp_path, capsys, no_model_load):
    folder = model_folder(tmp_path, tokenizer_config={"add_bos_token": "yes"})
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    assert f"{folder / 'tokenizer_config.json'}: add_bos_token must be true or false, got 'yes'" in capsys.readouterr().err


def test_a_list_of_eos_ids_in_config_json_stops_as_transformers_generate(tmp_path, recorded):
    """Without generation_config.json the stop ids are config.json's eos_token_id, which may be a list:
    it was wrapped in another list ([[2, 5]]) and generate crashed (full_like of a list)."""
    import json

    import transformers

    folder = model_folder(tmp_path, generation_config="absent")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 5]}))
    assert main(["generate", "--model", str(folder), "--ids", "1,2,3", "--device", "cpu"]) == 0
    expected = transformers.AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id
    assert recorded["eos"] == expected == [2, 5]
