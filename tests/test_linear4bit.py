"""Linear4bit and quantize_model: the frozen NF4 layer equals F.linear with its dequantized weight,
only the input gets gradients, and a quantized Transformer equals the same model holding the
dequantized weights in plain nn.Linear layers."""
import copy
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft import ModelConfig, Transformer, checkpoint, functional, load_pretrained
from minipeft.linear4bit import Linear4bit, dequantize_model, memory_footprint, quantize_model
from minipeft.nf4 import dequantize_nf4, quantize_nf4

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def tiny_transformer(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():  # non-zero biases, so a dropped bias shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def dequantized_twin(model: Transformer) -> Transformer:
    """A copy of `model` whose Linear weights (but lm_head) are replaced by their NF4 round trip."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in twin.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight)))
    return twin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_linear_with_dequantized_weight(bias, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(70, 33, bias=bias)  # 2310 weights: the last 64-block is partial
    layer = Linear4bit.from_linear(linear, double_quant=double_quant)
    w = dequantize_nf4(quantize_nf4(linear.weight, double_quant=double_quant))
    assert torch.equal(layer.dequantize(), w) and layer.dequantize().shape == (33, 70)
    x = torch.randn(2, 5, 70)
    # Same weight, same F.linear call: identical, no tolerance needed.
    assert torch.equal(layer(x), F.linear(x, w, linear.bias))
    assert (layer.in_features, layer.out_features) == (70, 33)
    # Quantization error only: NF4 keeps outputs within a few percent of the float layer.
    assert (layer(x) - linear(x)).norm() < 0.15 * linear(x).norm()


def test_gradient_reaches_the_input_only():
    torch.manual_seed(1)
    layer = Linear4bit.from_linear(nn.Linear(64, 48))
    assert all(not p.requires_grad for p in layer.parameters())
    assert not any(b.is_floating_point() for b in layer.buffers())  # nothing a gradient could reach
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 48)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantize(), rtol=1e-6, atol=1e-6)  # float32 matmul order
    assert layer.bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_linear_backward_equals_autograd_of_the_dequantized_weight(dtype):
    """functional.nf4_linear dequantizes W again in the backward: dx = g W and db = Σ g as autograd
    computes them from the kept W, for a 3-D x."""
    torch.manual_seed(3)
    q = quantize_nf4(torch.randn(40, 70))
    w = dequantize_nf4(q, dtype)
    x = torch.randn(2, 5, 70, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 5, 40, dtype=dtype)
    y = functional.nf4_linear(x, q, bias)
    assert torch.equal(y, F.linear(x, w, bias))
    got = torch.autograd.grad(y, (x, bias), g)
    want = torch.autograd.grad(F.linear(x, w, bias), (x, bias), g)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0 if dtype == torch.float32 else 0.1)  # sum order


def test_bfloat16_compute():
    torch.manual_seed(2)
    linear = nn.Linear(64, 32).bfloat16()
    layer = Linear4bit.from_linear(linear)
    assert layer.compute_dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), linear.bias))
    # float32 compute on a bfloat16 weight: x goes up, the output comes back as x's dtype.
    layer32 = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    w32 = dequantize_nf4(quantize_nf4(linear.weight), torch.float32)
    assert torch.equal(layer32(x), F.linear(x.float(), w32, linear.bias.float()).bfloat16())


@pytest.mark.parametrize("double_quant", [True, False])
def test_module_casts_keep_the_float32_constants(double_quant):
    torch.manual_seed(3)
    layer = Linear4bit.from_linear(nn.Linear(64, 64), double_quant=double_quant, compute_dtype=torch.float32)
    before = layer.dequantize()
    layer.to(torch.bfloat16)  # casts floating buffers; the float32 constants are held as int32 bits
    assert torch.equal(dequantize_nf4(layer.quantized_weight, torch.float32), before)
    assert layer.bias.dtype == layer.compute_dtype == layer.dequantize().dtype == torch.bfloat16  # as a Linear


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    torch.manual_seed(4)
    source = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    target = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    assert not torch.equal(target.dequantize(), source.dequantize())
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.dequantize(), source.dequantize())  # the cached offset follows the load
    nested = {"weight_nested_absmax", "weight_offset"} if double_quant else set()
    assert set(source.state_dict()) == {"weight_packed", "weight_absmax", "bias"} | nested


@pytest.mark.parametrize("double_quant", [True, False])
def test_strided_buffers_loaded_by_assignment_are_stored_contiguous(double_quant):
    """load_state_dict(assign=True) takes the state dict's tensors as the buffers: views among them are made
    contiguous at the load, once, so that every forward passes the kernels the buffers themselves, not copies."""
    torch.manual_seed(5)
    source = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    target = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    every_other = lambda t: torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    views = {k: every_other(v) if k.startswith("weight") and v.dim() else v for k, v in source.state_dict().items()}
    assert not views["weight_packed"].is_contiguous()
    target.load_state_dict(views, assign=True)
    assert all(b.is_contiguous() for b in target.buffers())
    q = target.quantized_weight  # what forward hands to functional.nf4_linear
    assert (q.data.data_ptr(), q.absmax.data_ptr()) == (target.weight_packed.data_ptr(),
                                                        target.weight_absmax.data_ptr())
    x = torch.randn(3, 96)
    assert torch.equal(target(x), source(x))


def test_quantize_model_replaces_all_linears_but_lm_head():
    model = tiny_transformer(attention_bias=True)
    twin = dequantized_twin(model)
    quantize_model(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {"lm_head"}
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 2 * 7 and "model.layers.1.mlp.down_proj" in quantized
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        # Same weights and ops; 1e-5 leaves room for float32 summation order only.
        torch.testing.assert_close(model(ids), twin(ids), rtol=0, atol=1e-5)


def test_quantize_model_skip_and_errors():
    model = tiny_transformer()
    quantize_model(model, skip=("lm_head", "q_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, Linear4bit)
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_model(tiny_transformer(), "int3")
    with pytest.raises(ValueError, match="compute_dtype must be"):
        quantize_model(tiny_transformer(), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="Linear4bit.from_linear"):
        quantize_model(nn.Linear(4, 4))


def test_shared_linear_stays_shared():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(model)
    assert isinstance(model[0], Linear4bit) and model[0] is model[2]


def test_memory_footprint_is_measured_from_buffers():
    model = quantize_model(tiny_transformer())
    report = memory_footprint(model)
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear4bit)]
    n = [o * i for o, i in shapes]
    assert report.quantized_params == sum(n)
    # Per weight matrix: packed codes + uint8 absmax codes + float32 nested absmax + float32 offset.
    expected = sum(math.ceil(k / 2) + math.ceil(k / 64) + 4 * math.ceil(math.ceil(k / 64) / 256) + 4 for k in n)
    assert report.quantized_bytes == expected
    assert 4.12 < report.bits_per_param < 4.2  # small matrices pay more for the nested absmax and offset
    floats = sum(p.nbytes for p in model.parameters())  # embeddings, norms, lm_head: still trainable here
    assert report.trainable_bytes == floats and report.frozen_bytes == expected
    model.requires_grad_(False)
    assert memory_footprint(model).frozen_bytes == expected + floats


@pytest.mark.parametrize("tie", [False, True])
def test_load_pretrained_nf4(tmp_path, tie):
    model = tiny_transformer(seed=5, tie_word_embeddings=tie, attention_bias=True)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", quantization="nf4")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Linear4bit)
    assert isinstance(loaded.lm_head, nn.Linear)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), dequantized_twin(model)(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_pretrained_nf4_quantizes_each_weight_as_it_reads_it(tmp_path, monkeypatch, dtype):
    """The peak is the 4-bit model plus one full-precision weight: when a weight is quantized, every
    weight quantized before it is already freed. Same buffers as quantizing the loaded model."""
    model = tiny_transformer(seed=6, attention_bias=True)
    model.save_pretrained(tmp_path / "m")
    seen: list[weakref.ref] = []

    def quantize_one(t, **kwargs):
        assert all(ref() is None for ref in seen), "an earlier full-precision weight is still alive"
        assert t.dtype == (dtype or torch.float32)  # cast first: the 4-bit weight computes in that dtype
        seen.append(weakref.ref(t))
        return quantize_nf4(t, **kwargs)

    monkeypatch.setattr(checkpoint, "quantize_nf4", quantize_one)
    loaded = load_pretrained(tmp_path / "m", dtype=dtype, quantization="nf4")
    assert len(seen) == 7 * CONFIG["num_hidden_layers"]  # q k v o gate up down, not lm_head
    # Nothing kept points into the file's mapping, so it is gone, with the pages read to quantize.
    assert str(tmp_path / "m") not in Path("/proc/self/maps").read_text()
    reference = quantize_model(load_pretrained(tmp_path / "m", dtype=dtype))
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    for name, t in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert all(m.compute_dtype == (dtype or torch.float32) for m in loaded.modules() if isinstance(m, Linear4bit))
    with pytest.raises(ValueError, match="unknown quantization method 'int8'"):
        load_pretrained(tmp_path / "m", quantization="int8")


def test_dequantize_model_inverts_quantize_model_up_to_nf4_rounding():
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4))
    quantize_model(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = model(ids)
        dequantize_model(model)
        assert not any(isinstance(m, Linear4bit) for m in model.modules())
        for name, layer in layers.items():
            linear = model.get_submodule(name)
            assert type(linear) is nn.Linear and not linear.weight.requires_grad
            assert torch.equal(linear.weight, layer.dequantize())
        torch.testing.assert_close(model(ids), expected, atol=1e-6, rtol=0)  # the same weights, one matmul each
