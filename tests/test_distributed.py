"""Which device a torchrun rank computes on: the model's check before the group is joined, and the
GPU use_device picks. No GPU needed: a stand-in model reports the devices its tensors claim."""
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minipeft import distributed


class OnDevices(nn.Module):
    """A model whose parameters and buffers are said to be on the given devices (named p0, p1, ...
    and b0, b1, ...): torch cannot make a CUDA tensor without a GPU."""

    def __init__(self, params, buffers=()):
        super().__init__()
        self.at = {"p": list(params), "b": list(buffers)}

    def _named(self, kind):
        return iter([(f"{kind}{i}", SimpleNamespace(device=torch.device(d))) for i, d in enumerate(self.at[kind])])

    def parameters(self, recurse=True):
        return (t for _, t in self._named("p"))

    def named_parameters(self, *args, **kwargs):
        return self._named("p")

    def named_buffers(self, *args, **kwargs):
        return self._named("b")


def test_a_trainer_joins_only_a_group_of_several(monkeypatch):
    """Built from Python, the Trainer joins torchrun's group when it started several processes; a
    plain process that merely has WORLD_SIZE=1 set (some schedulers export it) starts none."""
    joined = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.tdist, "init_process_group", joined.append)
    for world in ("1", "2"):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert distributed.join(nn.Linear(2, 2)) == torch.device("cpu")
    assert joined == ["gloo"]


@pytest.mark.parametrize("devices, environ", [
    (["cuda:1", "cuda:1"], {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}),  # its own GPU
    (["cuda:0"], {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}),  # a group of one
    (["cuda:3", "cuda:1"], {}),  # no torchrun: not checked
    (["cpu", "cpu"], {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}),  # CPU ranks (gloo) share the host
    # a launcher that shows each rank only its own GPU (Slurm --gpus-per-task=1): cuda:0 on every rank
    (["cuda:0"], {"WORLD_SIZE": "4", "LOCAL_RANK": "3", "RANK": "3", "CUDA_VISIBLE_DEVICES": "3"}),
    (["cuda:0"], {"WORLD_SIZE": "4", "LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "GPU-5ba0a3f6-8c1e"}),
])
def test_a_model_on_its_local_rank_gpu_is_taken(devices, environ):
    model = OnDevices(devices, buffers=devices[:1])
    assert distributed.check_local_device(model, environ) == torch.device(devices[0])


def test_a_model_on_another_ranks_gpu_is_refused_before_the_group_is_joined(monkeypatch):
    """Under torchrun on GPUs, a Python user's model left on cuda:0 on every rank ran all ranks on one
    GPU (or NCCL failed or hung): the error names the rank, its LOCAL_RANK and the model's device, and
    comes before the process group is joined."""
    environ = {"WORLD_SIZE": "8", "RANK": "6", "LOCAL_RANK": "2"}  # 2 nodes x 4 GPUs: the second node's third
    with pytest.raises(ValueError, match=re.escape("rank 6 (LOCAL_RANK=2): p0 is on cuda:0, but under torchrun each "
                                                   "process trains on its own GPU, cuda:LOCAL_RANK (here cuda:2); "
                                                   "move the whole model there")):
        distributed.check_local_device(OnDevices(["cuda:0"]), environ)
    joined = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.tdist, "init_process_group", joined.append)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"rank 6 \(LOCAL_RANK=2\): p0 is on cuda:0"):
        distributed.join(OnDevices(["cuda:0"]))
    assert joined == []
    assert distributed.join(OnDevices(["cuda:2"])) == torch.device("cuda:2")
    assert joined == ["nccl"]


@pytest.mark.parametrize("params, buffers, named", [
    (["cuda:2", "cuda:2", "cuda:0"], ["cuda:2"], "p2 is on cuda:0"),  # a later parameter
    (["cuda:2", "cuda:2"], ["cuda:2", "cuda:0", "cpu"], "b1 is on cuda:0"),  # a buffer, the first one off
    (["cuda:2"], ["cpu"], "b0 is on cpu"),  # a buffer left behind by a .to() of the parameters alone
])
def test_a_model_partly_on_another_device_names_the_first_tensor_off_it(params, buffers, named):
    """Only the first parameter's device was checked: a model with a buffer or a later parameter
    elsewhere passed and failed mid-step (or summed on the wrong GPU)."""
    environ = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"}
    with pytest.raises(ValueError, match=re.escape(f"rank 2 (LOCAL_RANK=2): {named}, but under torchrun each process "
                                                   "trains on its own GPU, cuda:LOCAL_RANK (here cuda:2)")):
        distributed.check_local_device(OnDevices(params, buffers), environ)


def test_a_cpu_rank_with_a_tensor_on_a_gpu_is_refused():
    environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    with pytest.raises(ValueError, match=re.escape("rank 1 (LOCAL_RANK=1): b0 is on cuda:1, but under torchrun each "
                                                   "process trains on one device, its first parameter's (here cpu); "
                                                   "move the whole model there before building the Trainer: "
                                                   "model.to(minipeft.distributed.use_device('cpu'))")):
        distributed.check_local_device(OnDevices(["cpu"], ["cuda:1"]), environ)


def test_a_real_model_is_checked_through_its_submodules():
    """The names are the model's own (named_parameters/named_buffers recurse), on a real module."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    environ = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert distributed.check_local_device(model, environ) == torch.device("cpu")
    model[1].running_mean = model[1].running_mean.to("meta")
    with pytest.raises(ValueError, match=r"1\.running_mean is on meta, .*\(here cpu\)"):
        distributed.check_local_device(model, environ)


@pytest.mark.parametrize("visible, local_rank, expected", [
    ("5", "1", 0),  # one GPU shown to this rank: it is cuda:0 whatever LOCAL_RANK says
    ("0,1", "1", 1),  # the node's GPUs shown to every rank: cuda:LOCAL_RANK
    ("", "1", 1),
])
def test_use_device_and_the_check_agree_on_the_gpu_a_launcher_shows(two_gpus, monkeypatch, visible, local_rank,
                                                                    expected):
    """A launcher that sets CUDA_VISIBLE_DEVICES per rank: use_device asked for cuda:LOCAL_RANK, which
    that rank does not have, and check_local_device refused the cuda:0 it does have."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len([d for d in visible.split(",") if d]) or 2)
    environ = {"WORLD_SIZE": "2", "RANK": local_rank, "LOCAL_RANK": local_rank, "CUDA_VISIBLE_DEVICES": visible}
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    device = distributed.use_device("cuda")
    assert device == torch.device("cuda", expected) and two_gpus == [device]
    assert distributed.check_local_device(OnDevices([str(device)]), environ) == device
