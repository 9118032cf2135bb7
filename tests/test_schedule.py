"""Learning-rate schedules against transformers.get_scheduler."""
import pytest
import torch

from minipeft.schedule import lr_factor
from minipeft.train_config import SCHEDULERS


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("total,warmup", [(50, 5), (7, 0), (10, 3)])
def test_schedules_match_transformers(name, total, warmup):
    import transformers
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    kwargs = {} if name == "constant" else {"num_warmup_steps": warmup}
    if name in ("linear", "cosine"):
        kwargs["num_training_steps"] = total
    sched = transformers.get_scheduler(name, opt, **kwargs)
    for step in range(total):
        assert lr_factor(name, step, total, warmup) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_lengthened_run_steps_on_by_the_new_schedule_as_transformers(name):
    """A 10-step run (1 warm-up step) resumed for 20 steps (2): transformers' Trainer rebuilds its
    scheduler for 20 steps and loads the saved one's state, which restores its step count only
    (its lambda, a partial, keeps the new total). From the second resumed step on, its learning rate is
    lr_factor(step, 20, 2), as the Trainer's; the first takes the rate its optimizer saved: 0, the
    old schedule's end, where the Trainer applies the new schedule from the first (Trainer.resume)."""
    import transformers

    def scheduled(total, warmup):
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
        return opt, transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)

    opt, sched = scheduled(10, 1)
    for _ in range(10):
        opt.step()
        sched.step()
    resumed, rebuilt = scheduled(20, 2)
    resumed.load_state_dict(opt.state_dict())
    rebuilt.load_state_dict(sched.state_dict())
    rates = []
    for _ in range(10, 20):
        rates.append(resumed.param_groups[0]["lr"])
        resumed.step()
        rebuilt.step()
    assert rates[0] == 0.0 < lr_factor(name, 10, 20, 2)
    assert rates[1:] == pytest.approx([lr_factor(name, step, 20, 2) for step in range(11, 20)], abs=1e-12)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("total", [1, 2])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 1.0])
def test_the_shortest_runs_match_transformers(name, total, warmup_ratio):
    """Runs of 1 and 2 steps, warm-up over none, ceil(0.1 T) or all of them (the Trainer's
    ceil(warmup_ratio x T), as transformers' get_warmup_steps); warm-up over the whole run is what
    transformers' warmup_steps=T gives (TrainConfig keeps warmup_ratio below 1)."""
    import math
    test_schedules_match_transformers(name, total, math.ceil(warmup_ratio * total))
