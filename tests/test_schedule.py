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
