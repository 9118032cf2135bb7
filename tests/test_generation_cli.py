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
