"""torch.compile(model) in a training step: the model traces as one graph (fullgraph=True) and the
loss and gradients equal eager's. The hand-written autograd Functions (minipeft.fused) are traced
through; RoPE's out= writes into chunk views have a compiler path, which Inductor needs. head_loss
stays eager: its boolean selection of the scored positions has a data-dependent shape."""
import pytest
import torch

from conftest import tiny_model
from minipeft.linear4bit import quantize_model
from minipeft.metrics import IGNORE_INDEX, head_loss
from minipeft.param_count import method_config
from minipeft.peft_model import full_finetune, get_peft_model

LORA = {"r": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
OPTIONS = {"lora": LORA, "qlora": LORA, "adapter": {"bottleneck_size": 8}, "prefix": {"num_virtual_tokens": 3},
           "prompt": {"num_virtual_tokens": 3}, "full": {}}
B, T, KEEP = 3, 11, 6


def step_grads(model, forward, ids, labels) -> tuple[torch.Tensor, dict]:
    loss = head_loss(forward(ids, return_hidden=True, logits_to_keep=KEEP), labels[:, -KEEP:],
                     model.get_output_embeddings())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check(family: str, method: str, backend: str) -> None:
    base = tiny_model(family)
    if method == "qlora":  # NF4 weights dequantized in the forward and again in the backward, traced too
        quantize_model(base)
    model = full_finetune(base) if method == "full" else get_peft_model(base, method_config(method, **OPTIONS[method]))
    with torch.no_grad():  # LoRA's B starts at zero, where A's gradient is zero whatever the code does
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :T - KEEP + 1] = IGNORE_INDEX
    labels[0, -2] = IGNORE_INDEX  # a masked token among the scored ones
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    want_loss, want = step_grads(model, model, ids, labels)
    got_loss, got = step_grads(model, compiled, ids, labels)
    # Float32; Inductor fuses and reorders the elementwise sums: a few ulps of the loss (~5), 1e-5 on grads.
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(got) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_traces_as_one_graph(family, method):
    """aot_eager: Dynamo and AOTAutograd trace forward and backward whole, no graph break."""
    check(family, method, "aot_eager")


@pytest.mark.parametrize("family, method", [("llama-gqa", "lora"), ("qwen2", "lora"), ("llama-gqa", "qlora")])
def test_inductor_lora_step(family, method):
    """Inductor generates the kernels (a C++ compiler on the CPU): the path users of torch.compile take."""
    check(family, method, "inductor")
