"""Bottleneck adapters: exact no-op at init, an eager hook reference, only adapters train, files, counts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from minipeft import ModelConfig, Transformer
from minipeft.adapter import AdapterConfig, BottleneckAdapter
from minipeft.lora import LoraConfig
from minipeft.peft_model import PeftModel, format_trainable, get_peft_model
from conftest import tiny_model
from test_lora import IDS, trained
from test_model_parity import padded_batch


def wrapped(peft_model):
    return sorted(n for n, m in peft_model.base_model.named_modules() if isinstance(m, BottleneckAdapter))


@pytest.mark.parametrize("placement,activation", [("houlsby", "relu"), ("pfeiffer", "gelu"), ("houlsby", "silu")])
def test_exact_no_op_at_init(family, placement, activation):
    model = tiny_model(family)
    ids, mask = padded_batch(T=9)
    ref = model(ids, attention_mask=mask)
    peft_model = get_peft_model(model, AdapterConfig(bottleneck_size=5, placement=placement, activation=activation))
    assert torch.equal(peft_model(ids, attention_mask=mask), ref)  # up = 0: y + 0 is y, bit for bit


def test_no_op_at_init_in_bf16_and_adapters_stay_float32():
    model = tiny_model().to(torch.bfloat16)
    ref = model(IDS)
    peft_model = get_peft_model(model, AdapterConfig(reduction_factor=8)).train()
    out = peft_model(IDS)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    layer = peft_model.base_model.model.layers[0].mlp.down_proj
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    out.float().logsumexp(-1).mean().backward()
    assert layer.adapter_up["default"].weight.grad.abs().sum() > 0


def test_placement_decides_the_wrapped_layers():
    houlsby = get_peft_model(tiny_model(), AdapterConfig(bottleneck_size=4))
    pfeiffer = get_peft_model(tiny_model(), AdapterConfig(bottleneck_size=4, placement="pfeiffer"))
    assert wrapped(houlsby) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.o_proj")]
    assert wrapped(pfeiffer) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    custom = get_peft_model(tiny_model(), AdapterConfig(bottleneck_size=4, target_modules=["up_proj"]))
    assert wrapped(custom) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


def adapter_by_hooks(model: Transformer, peft_model: PeftModel, activation) -> None:
    """Reference: the plain model with forward hooks y -> y + W_u act(W_d y + b_d) + b_u, per wrapped layer."""
    for name in wrapped(peft_model):
        layer = peft_model.base_model.get_submodule(name)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]

        def hook(module, args, y, down=down, up=up):
            return y + F.linear(activation(F.linear(y, down.weight, down.bias)), up.weight, up.bias)

        model.get_submodule(name).register_forward_hook(hook)


# Each activation by its formula, not by the torch function adapter.py calls.
FORMULAS = {
    "relu": lambda x: x.clamp(min=0),
    "tanh": lambda x: 1 - 2 / (torch.exp(2 * x) + 1),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "swish": lambda x: x / (1 + torch.exp(-x)),
}


@pytest.mark.parametrize("placement,name", [("houlsby", "relu"), ("pfeiffer", "tanh"), ("houlsby", "gelu"),
                                            ("pfeiffer", "gelu_tanh"), ("houlsby", "silu"), ("houlsby", "swish")])
def test_trained_adapter_matches_eager_hook_reference(placement, name):
    activation = FORMULAS[name]
    peft_model, _ = trained(AdapterConfig(bottleneck_size=6, placement=placement, activation=name), steps=2)
    up = peft_model.base_model.model.layers[1].mlp.down_proj.adapter_up["default"].weight
    assert up.abs().max() > 0  # trained: the adapter changes the output
    reference = tiny_model()
    adapter_by_hooks(reference, peft_model, activation)
    ids, mask = padded_batch(T=9, side="right")
    real = mask.bool()
    # float32, the same matmuls: observed 0 for relu; the formulas round differently from torch's
    # activation kernels, by ~1e-7 of O(1) values; 2e-6 catches any other activation (errors O(1e-2)).
    torch.testing.assert_close(peft_model(ids, attention_mask=mask)[real], reference(ids, attention_mask=mask)[real],
                               atol=2e-6, rtol=0)
    assert not torch.allclose(peft_model(IDS), tiny_model()(IDS), atol=1e-3)


def test_only_adapters_train_and_frozen_weights_stay_bit_identical():
    peft_model, before = trained(AdapterConfig(bottleneck_size=4), steps=3)
    for name, p in peft_model.base_model.named_parameters():
        is_adapter = ".adapter_down." in name or ".adapter_up." in name
        assert p.requires_grad == is_adapter, name
        if not is_adapter:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    peft_model(IDS).logsumexp(-1).mean().backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in peft_model.named_parameters() if p.requires_grad} and grads


def test_parameter_count_formula_on_a_tiny_model():
    cfg = AdapterConfig(reduction_factor=16)  # d = 64 -> m = 4
    peft_model = get_peft_model(tiny_model(), cfg)
    d, m = 64, 4
    assert peft_model.get_nb_trainable_parameters()[0] == 4 * (2 * d * m + m + d)  # 2 layers x (o_proj, down_proj)


@pytest.mark.parametrize("placement,expected", [
    ("houlsby", "trainable params: 201,613,312 || all params: 6,940,028,928 || trainable%: 2.9051"),
    ("pfeiffer", "trainable params: 100,806,656 || all params: 6,839,222,272 || trainable%: 1.4739"),
])
def test_llama_2_7b_counts_at_bottleneck_384(placement, expected, capsys):
    """m = 384 puts Houlsby adapters at ~3% of LLaMA-2-7B (m = 400 gives 3.02%; 384 is a multiple of 128)."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("llama-2-7b"))
    base = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, AdapterConfig(bottleneck_size=384, placement=placement))
    d, m, L = 4096, 384, 32
    per_layer = {"houlsby": 2, "pfeiffer": 1}[placement]
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == L * per_layer * (2 * d * m + m + d) and total == base + trainable
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out == expected + "\n"
    assert format_trainable(trainable, total) == expected


def test_save_load_round_trip_and_file_layout(tmp_path):
    ours, _ = trained(AdapterConfig(bottleneck_size=3, activation="gelu"), family="qwen2", steps=2)
    ours.save_pretrained(tmp_path)
    expected = ours(IDS)
    keys = sorted(safe_open(str(tmp_path / "adapter_model.safetensors"), "pt").keys())
    assert len(keys) == 2 * 2 * 4  # 2 layers x 2 placements x (down, up) x (weight, bias)
    assert "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight" in keys
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK_ADAPTER" and cfg["bottleneck_size"] == 3 and cfg["activation"] == "gelu"
    loaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    torch.testing.assert_close(loaded(IDS), expected, atol=0, rtol=0)  # same tensors, same ops
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference
    resumed = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == 4 * (2 * 64 * 3 + 3 + 64)


def test_loading_checks_shapes(tmp_path):
    ours, _ = trained(AdapterConfig(bottleneck_size=3))
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "bottleneck_size": 5}))
    with pytest.raises(ValueError, match=r"o_proj.adapter_down.weight: expected \(5, 64\), found \(3, 64\)"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


def test_merge_is_refused_and_unload_gives_the_base_model():
    peft_model, _ = trained(AdapterConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="BottleneckAdapter cannot be merged.*not a linear function"):
        peft_model.base_model.model.layers[0].mlp.down_proj.merge()
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="BOTTLENECK_ADAPTER has no weight update to merge"):
        peft_model.merge_adapter()
    base = peft_model.unload()
    assert not any(isinstance(m, BottleneckAdapter) for m in base.modules())
    torch.testing.assert_close(base(IDS), tiny_model()(IDS), atol=0, rtol=0)


def test_disable_adapter_and_several_named_adapters():
    peft_model, _ = trained(AdapterConfig(bottleneck_size=4))
    tuned, base = peft_model(IDS), tiny_model()(IDS)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(IDS), base, atol=0, rtol=0)
    peft_model.add_adapter("small", AdapterConfig(bottleneck_size=2, placement="pfeiffer"))
    torch.testing.assert_close(peft_model(IDS), tuned, atol=0, rtol=0)  # added, not active
    peft_model.set_adapter("small")
    torch.testing.assert_close(peft_model(IDS), base, atol=0, rtol=0)  # its up-projection is still zero
    o_proj = peft_model.base_model.model.layers[0].self_attn.o_proj
    assert o_proj.active_adapter is None  # "small" has no adapter after attention
    peft_model.delete_adapter("default")
    assert wrapped(peft_model) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_lora_and_adapter_cannot_share_a_module():
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="o_proj is already wrapped by LoraLinear"):
        peft_model.add_adapter("adapter", AdapterConfig(bottleneck_size=2))


def test_bad_configs():
    with pytest.raises(ValueError, match="exactly one of bottleneck_size and reduction_factor"):
        AdapterConfig()
    with pytest.raises(ValueError, match="exactly one"):
        AdapterConfig(bottleneck_size=4, reduction_factor=4)
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        AdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="placement must be one of"):
        AdapterConfig(bottleneck_size=4, placement="parallel")
    with pytest.raises(ValueError, match="activation must be one of"):
        AdapterConfig(bottleneck_size=4, activation="softmax")
    with pytest.raises(ValueError, match="reduction_factor=128 leaves no bottleneck for a layer of width 64"):
        get_peft_model(tiny_model(), AdapterConfig(reduction_factor=128))
