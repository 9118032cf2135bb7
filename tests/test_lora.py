"""LoRA's maths: a no-op at init, merge == unmerged forward, reversible merge, only adapters train."""
import contextlib
import io

import pytest
import torch
from torch import nn

from minipeft import ModelConfig, Transformer
from minipeft.lora import LoraConfig, LoraLinear
from minipeft.peft_model import PeftModel, get_peft_model
from conftest import tiny_model

IDS = torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(0))


def trained(config: LoraConfig, family="llama-gqa", steps=1):
    """A PeftModel after `steps` AdamW steps, so B != 0 (a merge test at init proves nothing)."""
    model = tiny_model(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, config).train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        peft_model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval(), before


def test_outline_config_is_a_no_op_at_init():
    model = tiny_model()
    ref = model(IDS)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                                  target_modules=["q_proj", "v_proj"])).eval()
    assert torch.equal(peft_model(IDS), ref)
    layer = peft_model.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.scaling["default"] == 32 / 8
    assert layer.lora_A["default"].weight.shape == (8, 64) and layer.lora_B["default"].weight.shape == (64, 8)


def test_only_adapters_train_and_frozen_weights_stay_bit_identical():
    peft_model, before = trained(LoraConfig(r=4, target_modules="all-linear"), steps=3)
    for name, p in peft_model.base_model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_adapter, name
        if not is_adapter:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)


def test_merge_equals_unmerged_and_is_reversible_and_idempotent():
    peft_model, _ = trained(LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    q = peft_model.base_model.model.layers[1].self_attn.q_proj
    W0 = q.base_layer.weight.clone()
    delta = 16 / 4 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert delta.abs().max() > 0
    unmerged = peft_model(IDS)
    peft_model.merge_adapter()
    peft_model.merge_adapter()  # twice == once
    torch.testing.assert_close(q.base_layer.weight, W0 + delta, atol=1e-6, rtol=0)
    # float32: merged and factored forward differ only by summation order (~1e-7 relative).
    torch.testing.assert_close(peft_model(IDS), unmerged, atol=1e-5, rtol=0)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(q.base_layer.weight, W0, atol=1e-6, rtol=0)  # one fp32 rounding of W+Δ-Δ
    torch.testing.assert_close(peft_model(IDS), unmerged, atol=1e-5, rtol=0)


def test_train_and_eval_never_merge():
    peft_model, _ = trained(LoraConfig(r=4))
    W = peft_model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    peft_model.train(), peft_model.eval(), peft_model.train()
    assert torch.equal(peft_model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight, W)


def test_merge_and_unload_gives_plain_model_with_same_logits():
    peft_model, _ = trained(LoraConfig(r=4, target_modules="all-linear"))
    expected = peft_model(IDS)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, Transformer)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=0)


def test_non_finite_merge_is_refused():
    peft_model, _ = trained(LoraConfig(r=2))
    q = peft_model.base_model.model.layers[0].self_attn.q_proj
    W = q.base_layer.weight.clone()
    with torch.no_grad():
        q.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        peft_model.merge_adapter()
    assert torch.equal(q.base_layer.weight, W)


def test_disable_adapter_gives_base_logits_even_when_merged():
    peft_model, _ = trained(LoraConfig(r=4))
    base = tiny_model()(IDS)
    tuned = peft_model(IDS)
    peft_model.merge_adapter()
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(IDS), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(peft_model(IDS), tuned, atol=1e-5, rtol=0)
    assert peft_model.base_model.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]


def test_dropout_touches_only_the_lora_branch():
    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.9)).train()
    # B = 0 at init: whatever dropout does to the LoRA input, the output is the base output.
    torch.testing.assert_close(peft_model(IDS), tiny_model()(IDS), atol=0, rtol=0)


@pytest.mark.parametrize("use_rslora,init", [(False, "gaussian"), (True, True)])
def test_scaling_and_init_variants(use_rslora, init):
    cfg = LoraConfig(r=16, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=init)
    layer = get_peft_model(tiny_model(), cfg).base_model.model.layers[0].self_attn.v_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 if use_rslora else 8 / 16)
    A = layer.lora_A["default"].weight
    if init == "gaussian":
        assert abs(A.std().item() - 1 / 16) < 0.02  # 16 x 64 draws of N(0, 1/r)
    else:
        bound = (1 / 64) ** 0.5  # kaiming_uniform(a=sqrt 5) on fan_in 64 = U(-1/sqrt(in), 1/sqrt(in))
        assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))


def test_target_module_forms():
    def targets(t):
        pm = get_peft_model(tiny_model(), LoraConfig(target_modules=t))
        return sorted(n for n, m in pm.base_model.named_modules() if isinstance(m, LoraLinear))

    assert targets(None) == targets(["q_proj", "v_proj"])  # PEFT's default for LLaMA-family models
    assert len(targets(["q_proj", "v_proj"])) == 4
    assert targets(r"model\.layers\.1\.mlp\.(gate|up)_proj") == ["model.layers.1.mlp.gate_proj",
                                                                 "model.layers.1.mlp.up_proj"]
    all_linear = targets("all-linear")
    assert len(all_linear) == 2 * 7 and not any("lm_head" in n for n in all_linear)
    with pytest.raises(ValueError, match=r"matched no module.*'down_proj'.*'q_proj'"):
        targets(["query_key_value"])
    with pytest.raises(ValueError, match="not Linear"):
        targets(["self_attn"])


def test_print_trainable_parameters_llama_2_7b_outline_config():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("llama-2-7b"))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                                  target_modules=["q_proj", "v_proj"]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        peft_model.print_trainable_parameters()
    assert out.getvalue() == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"


def test_several_named_adapters(tmp_path):
    first, _ = trained(LoraConfig(r=4))
    first.save_pretrained(tmp_path / "a")
    second, _ = trained(LoraConfig(r=2, target_modules=["o_proj"]), steps=2)
    second.save_pretrained(tmp_path / "b")
    expected_a, expected_b = first(IDS), second(IDS)

    served = PeftModel.from_pretrained(tiny_model(), tmp_path / "a", adapter_name="a")
    served.load_adapter(tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(served(IDS), expected_a, atol=1e-6, rtol=0)
    served.set_adapter("b")
    torch.testing.assert_close(served(IDS), expected_b, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in served.parameters())  # loaded for inference
    served.delete_adapter("b")
    assert served.active_adapter == "a" and list(served.peft_config) == ["a"]
    assert not any(isinstance(m, LoraLinear) for n, m in served.base_model.named_modules() if "o_proj" in n)
    torch.testing.assert_close(served(IDS), expected_a, atol=1e-6, rtol=0)


def test_bf16_base_keeps_float32_adapters():
    model = tiny_model().to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4)).train()
    layer = peft_model.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = peft_model(IDS)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_bad_configs():
    with pytest.raises(ValueError, match="r must be a positive"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias="some")


def test_dropout_is_active_in_training_only():
    peft_model, _ = trained(LoraConfig(r=4, lora_dropout=0.5))
    eval_out = peft_model.eval()(IDS)
    peft_model.train()
    torch.manual_seed(0)
    a = peft_model(IDS)
    torch.manual_seed(0)
    b = peft_model(IDS)
    assert torch.equal(a, b)  # the mask comes from torch's RNG: seeded, it repeats
    assert (a - eval_out).abs().max() > 1e-4
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(IDS), tiny_model().train()(IDS), atol=0, rtol=0)


def test_inits_that_cannot_be_run_here_are_refused():
    for init in ("pissa", "olora", "loftq"):  # they rewrite the base weights as well
        with pytest.raises(ValueError, match=f"leave the base weights unchanged.*got '{init}'"):
            LoraConfig(init_lora_weights=init)
    with pytest.raises(ValueError, match="'eva' sets A from the SVD .* not implement"):
        get_peft_model(tiny_model(), LoraConfig(init_lora_weights="eva"))
    with pytest.raises(ValueError, match="'orthogonal' needs an even rank r, got 3"):
        get_peft_model(tiny_model(), LoraConfig(r=3, init_lora_weights="orthogonal"))
