"""The Trainer's Python API on bad input and edge cases: each once crashed deep inside torch, named
the wrong example, divided by zero, or trained nothing silently; now a clear error names the
argument or setting (or the Trainer does what transformers' Trainer does)."""
import numpy as np
import pytest
import torch

from conftest import tiny_model
from minipeft.lora import LoraConfig
from minipeft.model import Transformer
from minipeft.peft_model import full_finetune, get_peft_model
from minipeft.train_config import TrainConfig
from minipeft.trainer import Trainer
from test_trainer import ragged_data


def config(tmp_path, **overrides):
    return TrainConfig(**{"output_dir": str(tmp_path / "run"), "batch_size": 2, "n_epochs": 1, "logging_steps": 1,
                          "disable_tqdm": True, "report_to": "none", **overrides})


def lora(**overrides):
    torch.manual_seed(0)
    return get_peft_model(tiny_model(**overrides), LoraConfig(r=2, lora_dropout=0.0))


@pytest.mark.parametrize("data,match", [
    ([], r"train_data is empty"),
    ((x for x in []), r"train_data is empty"),  # a generator: was a ZeroDivisionError
    ([{"input_ids": [1, 2], "labels": [1, 2]}], r"train_data\[0\] is a dict \(keys \['input_ids', 'labels'\]\)"),
    ([[1, 2, 3]], r"train_data\[0\]: expected an \(input_ids, labels\) pair"),
    ([([1.0, 2.0], [1, 2])], r"train_data\[0\]: expected an \(input_ids, labels\) pair of integer lists"),
    (ragged_data(5) + [([1, 2, 3], [1, 2])], r"train_data\[5\]: input_ids has 3 tokens and labels 2"),  # was [1]
    (ragged_data(5) + [([], [])], r"train_data\[5\]: input_ids has 0 tokens"),
    (ragged_data(3) + [([1, 500], [1, 500])], r"train_data\[3\]: input id 500 is outside the model's vocabulary "
                                              r"\[0, 131\)"),  # was IndexError: index out of range in self
    ([([1, -1], [1, 2])], r"input id -1 is outside"),
    ([([1, 2], [-100, 131])], r"label 131 is outside the model's vocabulary \[0, 131\) \(and not -100"),
    ([([1, 2, 3], [-100, -100, -100]), ([4, 5], [4, -100])], r"train_data: no supervised token in its 2 examples"),
])
def test_bad_training_examples_are_named(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        Trainer(config(tmp_path), lora(), data)


def test_an_example_past_max_length_is_named_packed_or_not(tmp_path):
    """Unpacked, max_length was ignored (a job drops longer examples; from Python they trained);
    packed, the error named the example's index after the packing shuffle."""
    data = ragged_data(6) + [(list(range(1, 20)), list(range(1, 20)))]
    for packing in (False, True):
        with pytest.raises(ValueError, match=r"train_data\[6\] has 19 tokens > max_length 16"):
            Trainer(config(tmp_path, max_length=16, packing=packing), lora(), data)


def test_fully_masked_eval_data_is_refused_before_training(tmp_path):
    """It trained a whole epoch, then its evaluation divided by zero supervised tokens."""
    masked = [(ids, [-100] * len(ids)) for ids, _ in ragged_data(4, seed=1)]
    with pytest.raises(ValueError, match=r"eval_data: no supervised token in its 4 examples"):
        Trainer(config(tmp_path), lora(), ragged_data(8), masked)


def test_tensors_and_numpy_arrays_are_examples_too(tmp_path):
    data = ragged_data(4)
    as_lists = Trainer(config(tmp_path / "a"), lora(), data).train()
    as_arrays = Trainer(config(tmp_path / "b"), lora(),
                        [(torch.tensor(i), np.array(l)) for i, l in data]).train()  # torch: was a RuntimeError
    assert as_arrays.train_loss == as_lists.train_loss


@pytest.mark.parametrize("pad_id", [-1, 131])
def test_a_pad_id_outside_the_vocabulary_is_named(tmp_path, pad_id):
    with pytest.raises(ValueError, match=rf"pad_id {pad_id} is outside the model's vocabulary \[0, 131\)"):
        Trainer(config(tmp_path), lora(), ragged_data(4), pad_id=pad_id)


def test_models_that_cannot_train_are_refused(tmp_path):
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters .*get_peft_model"):
        Trainer(config(tmp_path), frozen, ragged_data(4))
    with torch.device("meta"):
        meta = full_finetune(Transformer(tiny_model().config))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is on the meta device"):  # was deep in torch
        Trainer(config(tmp_path), meta, ragged_data(4))
    # TrainConfig refuses bf16 with method="full"; from Python the model's own dtype told nothing
    with pytest.raises(ValueError, match=r"embed_tokens.weight is a trainable torch.bfloat16 parameter"):
        Trainer(config(tmp_path), full_finetune(tiny_model().to(torch.bfloat16)), ragged_data(4))
    # LoRA over a bf16 base: float32 adapters, and a bf16 trained copy of lm_head, trained as PEFT does
    peft_bf16 = get_peft_model(tiny_model().to(torch.bfloat16), LoraConfig(r=2, target_modules=["q_proj"],
                                                                            modules_to_save=["lm_head"]))
    Trainer(config(tmp_path, bf16=True), peft_bf16, ragged_data(4))


def test_the_config_is_checked_when_the_trainer_is_built(tmp_path):
    with pytest.raises(TypeError, match=r"config: expected a TrainConfig .* got dict"):
        Trainer({"output_dir": str(tmp_path)}, lora(), ragged_data(4))
    cfg = config(tmp_path)
    cfg.batch_size = 0  # set after construction: was a ZeroDivisionError
    with pytest.raises(ValueError, match=r"batch_size=0 \(expected >= 1\)"):
        Trainer(cfg, lora(), ragged_data(4))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir .*file: exists and is not a directory"):
        Trainer(config(tmp_path, output_dir=str(tmp_path / "file")), lora(), ragged_data(4))  # was FileExistsError


def test_evaluate_and_resume_without_their_input_are_errors_as_in_transformers(tmp_path):
    """transformers' Trainer: "evaluation requires an eval_dataset"; train(resume_from_checkpoint=True)
    with none: "No valid checkpoint found". Here evaluate() divided by zero tokens, and a resume
    silently started a new run."""
    t = Trainer(config(tmp_path), lora(), ragged_data(4))
    with pytest.raises(ValueError, match="evaluation requires eval_data"):
        t.evaluate()
    with pytest.raises(ValueError, match="no checkpoint to resume from in output_dir"):
        t.train(resume=True)


def test_resume_on_other_data_or_another_kind_of_model_is_refused(tmp_path):
    cfg = config(tmp_path)
    Trainer(cfg, lora(), ragged_data(8)).train()
    longer = config(tmp_path, n_epochs=2)
    for data in (ragged_data(8, seed=5), ragged_data(20)):  # the same or another size: was continued silently
        with pytest.raises(ValueError, match=r"trained on other data \(8 examples, sha256 .*\) than this run's "
                                             rf"\({len(data)}, "):
            Trainer(longer, lora(), data).train(resume=True)
    with pytest.raises(ValueError, match=r"checkpoint-4: a checkpoint of a PEFT adapter, but the model to resume is "
                                         "not a PeftModel"):  # was: model/: no model.safetensors
        Trainer(longer, full_finetune(tiny_model()), ragged_data(8)).train(resume=True)
    assert Trainer(longer, lora(), ragged_data(8)).train(resume=True).steps == 8


@pytest.mark.parametrize("returned,error,match", [
    (None, TypeError, "compute_metrics returned NoneType: expected a dict"),
    ({"bleu": "high"}, TypeError, "compute_metrics returned 'bleu': 'high': expected a number"),
    ({"eval_loss": 0.0}, ValueError, "compute_metrics returned the key 'eval_loss'"),
])
def test_compute_metrics_results_are_checked(tmp_path, returned, error, match):
    t = Trainer(config(tmp_path), lora(), ragged_data(4), ragged_data(2, seed=1), compute_metrics=lambda m: returned)
    with pytest.raises(error, match=match):
        t.evaluate()


def test_compute_metrics_may_return_tensors_and_numpy_numbers(tmp_path):
    """As transformers' Trainer (denumpify_detensorize): they were a JSON error once training had run."""
    metrics = lambda m: {"a": torch.tensor(1.5), "b": np.float32(0.25), "c": np.int64(3)}
    t = Trainer(config(tmp_path), lora(), ragged_data(4), ragged_data(2, seed=1), compute_metrics=metrics)
    result = t.train()
    assert (result.eval["a"], result.eval["b"], result.eval["c"]) == (1.5, 0.25, 3)


@pytest.mark.parametrize("bf16,base", [(True, torch.float32), (False, torch.bfloat16)])
def test_a_bf16_setting_the_model_does_not_follow_is_warned_of(tmp_path, bf16, base):
    """bf16 is how run_job loads the base: from Python the model comes as it is, and a float32 LoRA run
    recorded bf16=True in its checkpoints without a word."""
    model = get_peft_model(tiny_model().to(base), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=f"bf16={bf16}, but the model's frozen weights are {base}"):
        Trainer(config(tmp_path, bf16=bf16), model, ragged_data(4))


@pytest.mark.parametrize("output_dir", ["", "  "])
def test_an_empty_output_dir_is_refused(output_dir):
    """Path("") is the current folder: a Trainer wrote its checkpoints and metrics among the user's files."""
    with pytest.raises(ValueError, match=r"output_dir='\s*' \(expected a directory path"):
        TrainConfig(output_dir=output_dir)
