"""One training step against the reference tools, dropout on: LoRA against peft, QLoRA against peft over
bitsandbytes' NF4 Linear4bit (quantized by bitsandbytes itself). The same seed draws the same dropout
masks in both tools (torch's CPU bernoulli stream is the same for our uint8 mask as for nn.Dropout's
float one, and both draw once per targeted module, in forward order), so the loss and every adapter
gradient must agree value for value, not only in distribution."""
import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

from conftest import same_random_adapter, tiny_model, to_hf
from minipeft.linear4bit import quantize_model
from minipeft.lora import LoraConfig
from minipeft.metrics import IGNORE_INDEX, causal_lm_loss
from minipeft.peft_model import get_peft_model

CFG = dict(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear")
SEED = 3


def to_bnb_nf4(hf: nn.Module) -> nn.Module:
    """Every Linear but lm_head as bitsandbytes' Linear4bit: NF4, blocks of 64, double quantization."""
    for name, m in list(hf.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), compress_statistics=True, quant_type="nf4",
                                         module=q)._quantize("cpu")
            if m.bias is not None:
                q.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
            hf.set_submodule(name, q)
    hf.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit in its bitsandbytes LoRA layer
    return hf


def pair(family: str, quantized: bool):
    """(ours, peft's): the same base weights and the same random adapter weights, in training mode."""
    # Rows of whole 64-blocks, as in real models: bitsandbytes 0.50's CPU kernel mis-scales rows that end
    # inside a block, (48, 48) and (64, 96) among them (test_nf4.test_bitsandbytes_cpu_kernel_on_partial_row_blocks).
    base = tiny_model(family, hidden_size=64, intermediate_size=128)
    hf = to_hf(base)
    if quantized:
        quantize_model(base)
        to_bnb_nf4(hf)
    ours = get_peft_model(base, LoraConfig(**CFG)).train()
    ref = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **CFG)).train()
    if quantized:
        assert isinstance(ref.base_model.model.model.layers[0].mlp.up_proj, peft.tuners.lora.bnb.Linear4bit)
    same_random_adapter(ours, ref, std=0.1)
    return ours, ref


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (3, 13), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt, as in fine-tuning
    return ids, labels


def our_step(model, ids, labels, seed: int = SEED) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    loss = causal_lm_loss(model(ids), labels)
    loss.backward()
    return loss.detach(), {n.replace("base_model.", "base_model.model.", 1): p.grad
                           for n, p in model.named_parameters() if p.requires_grad}


def peft_step(model, ids, labels) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(SEED)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_training_step_with_dropout_equals_peft(family, quantized):
    ours, ref = pair(family, quantized)
    ids, labels = batch(ours.config.vocab_size)
    loss, grads = our_step(ours, ids, labels)
    ref_loss, ref_grads = peft_step(ref, ids, labels)
    # float32, the same masks and weights; the sums differ in order only (observed ~1e-7).
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * ours.config.num_hidden_layers
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # The agreement is the masks', not a test blind to them: another seed draws others.
    ours.zero_grad(set_to_none=True)
    other_loss, _ = our_step(ours, ids, labels, seed=SEED + 1)
    assert (other_loss - ref_loss).abs() > 1e-4
