"""QLoRA = LoRA over a frozen NF4 base: composition, counted and merged honestly."""
import contextlib
import io

import pytest
import torch
from torch import nn

from minipeft import ModelConfig, Transformer, load_pretrained
from minipeft.linear4bit import Linear4bit, memory_footprint, quantize_model
from minipeft.lora import LoraConfig, LoraLinear
from minipeft.peft_model import get_peft_model
from conftest import tiny_model
from test_lora import IDS

CFG = dict(r=4, lora_alpha=16, target_modules="all-linear")


def dequantized_twin(model4: Transformer) -> Transformer:
    """The same model with every 4-bit weight replaced by its dequantized float32 values."""
    twin = tiny_model()
    for name, m in model4.named_modules():
        if isinstance(m, Linear4bit):
            twin.get_submodule(name).weight.data.copy_(m.dequantize().float())
    return twin


def test_qlora_logits_equal_lora_over_dequantized_weights():
    q = tiny_model()
    quantize_model(q)
    twin = dequantized_twin(q)
    torch.manual_seed(1)
    qlora = get_peft_model(q, LoraConfig(**CFG, init_lora_weights=False))
    torch.manual_seed(1)
    lora = get_peft_model(twin, LoraConfig(**CFG, init_lora_weights=False))
    assert isinstance(qlora.base_model.model.layers[0].mlp.up_proj.base_layer, Linear4bit)
    # Same dequantized weights and same adapter: float32 op order is identical (F.linear), ~1e-7.
    torch.testing.assert_close(qlora(IDS), lora(IDS), atol=1e-5, rtol=0)


def saved_for_backward(model, ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss, and every tensor autograd saved for the backward while computing it."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(ids).logsumexp(-1).mean()
    return loss, saved


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)  # merged path, twin
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_saves_no_dequantized_weight_for_the_backward(compute_dtype, dropout):
    """Autograd would keep every layer's dequantized W: a full-precision copy of the model. Only 4-bit
    weights may stay between forward and backward (parameters are the model's own storage)."""
    q = tiny_model()
    quantize_model(q, compute_dtype=compute_dtype)
    qlora = get_peft_model(q, LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]))
    shapes = {(m.out_features, m.in_features) for m in q.modules() if isinstance(m, Linear4bit)}
    own = {p.data_ptr() for p in qlora.parameters()}
    loss, saved = saved_for_backward(qlora.train(), torch.randint(0, 131, (3, 5)))  # 15 rows: no weight's shape
    kept = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes
            and t.data_ptr() not in own]
    assert not kept, f"dequantized weights kept for the backward: {kept}"
    loss.backward()
    assert all(p.grad is not None for p in qlora.parameters() if p.requires_grad)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_gradients_equal_lora_over_dequantized_weights(dropout):
    """The adapters' gradients and the input's, through the weights dequantized again in the backward."""
    q = tiny_model()
    quantize_model(q)
    twin = dequantized_twin(q)
    cfg = dict(CFG, lora_dropout=dropout, init_lora_weights=False)
    models = []
    for base in (q, twin):
        torch.manual_seed(1)
        models.append(get_peft_model(base, LoraConfig(**cfg)).train())
    grads = []
    for model in models:
        torch.manual_seed(2)  # the same dropout masks
        model(IDS).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, atol=1e-6, rtol=1e-5, msg=n)  # float32, same op order


def test_qlora_trains_only_adapters_and_keeps_4bit_buffers():
    q = tiny_model()
    quantize_model(q)
    before = {n: b.clone() for n, b in q.named_buffers()}
    qlora = get_peft_model(q, LoraConfig(**CFG)).train()
    opt = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=1e-2)
    qlora(IDS).logsumexp(-1).mean().backward()
    opt.step()
    trainable = [n for n, p in qlora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for n, b in qlora.base_model.named_buffers():
        assert torch.equal(b, before[n.replace(".base_layer", "")]), n


def test_merge_and_unload_returns_16_32_bit_layers_with_same_logits():
    q = tiny_model()
    quantize_model(q)
    qlora = get_peft_model(q, LoraConfig(**CFG, init_lora_weights=False)).eval()
    expected = qlora(IDS)
    with pytest.raises(ValueError, match="4-bit base weight cannot take a reversible merge"):
        qlora.merge_adapter()
    merged = qlora.merge_and_unload()
    assert not any(isinstance(m, (Linear4bit, LoraLinear)) for m in merged.modules())
    assert type(merged.model.layers[1].self_attn.o_proj) is nn.Linear
    torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=0)


def test_parameter_counts_report_unquantized_elements():
    q, f = tiny_model(), tiny_model()
    quantize_model(q)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    assert get_peft_model(q, cfg).get_nb_trainable_parameters() == get_peft_model(f, cfg).get_nb_trainable_parameters()


def test_bits_per_parameter_from_stored_buffers():
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                                    num_attention_heads=8))
    quantize_model(model)
    # 4 bits + one 8-bit absmax code per 64 + one float32 per 256 absmax: 4 + 8/64 + 32/16384 = 4.127
    assert memory_footprint(model).bits_per_param == pytest.approx(4.127, abs=1e-3)


def test_load_pretrained_nf4_then_lora(tmp_path):
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path)
    q = load_pretrained(tmp_path, quantization="nf4")
    with pytest.raises(ValueError, match="4-bit"):
        q.save_pretrained(tmp_path / "again")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        get_peft_model(q, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).print_trainable_parameters()
    f_out = io.StringIO()
    with contextlib.redirect_stdout(f_out):
        get_peft_model(tiny_model("qwen2"), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
                       ).print_trainable_parameters()
    assert out.getvalue() == f_out.getvalue()


def test_merged_qlora_model_is_all_16_32_bit_and_saves(tmp_path):
    """Untargeted 4-bit layers too come back as Linear holding the weight they computed with, so the merged
    model saves (PEFT + bitsandbytes instead re-quantize merged layers: an NF4 model, which has no
    Hugging Face form here, and whose 4-bit rounding would erase most of the update)."""
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    q = load_pretrained(tmp_path / "base", quantization="nf4")
    o_proj = q.model.layers[0].self_attn.o_proj
    qlora = get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = qlora(IDS)
        merged = qlora.merge_and_unload()
        assert not any(isinstance(m, (Linear4bit, LoraLinear)) for m in merged.modules())
        assert torch.equal(merged.model.layers[0].self_attn.o_proj.weight, o_proj.dequantize())
        torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=0)  # float32: ~1e-6 observed
        merged.save_pretrained(tmp_path / "merged")
        torch.testing.assert_close(load_pretrained(tmp_path / "merged")(IDS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loaded, cast", [(None, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_cast_nf4_model_merges_into_its_own_dtype(loaded, cast, tmp_path):
    """model.to(dtype) after an NF4 load moves compute_dtype too: merge_and_unload's Linears used to
    keep the load-time dtype, and the merged model failed ("mat1 and mat2 must have the same dtype")."""
    tiny_model("qwen2").save_pretrained(tmp_path)
    model = get_peft_model(load_pretrained(tmp_path, dtype=loaded, quantization="nf4").to(cast),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        expected = model(IDS)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)} == {cast}
    merged = model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {cast}
    with torch.no_grad():  # the merged W + ΔW is rounded to bf16 once, in either direction of the cast
        torch.testing.assert_close(merged(IDS), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float32_activations_over_a_bfloat16_compute_keep_the_lora_update_in_float32(dropout):
    """QLoRA's usual setup, a float32 model quantized with compute_dtype=bfloat16: as PEFT over bitsandbytes,
    the 4-bit matmul runs in bfloat16 and comes back in float32, and the LoRA branch, from x itself, is added
    there. The update used to be rounded to bfloat16's step of the base output (|y|/256): 3.8e-3 off an update
    of 5.7e-3 here, most of it lost, where PEFT is off by 5e-8."""
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.bfloat16)
    layer = LoraLinear(q)
    layer.add_adapter("default", LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout))
    layer.set_adapter("default")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_(std=1e-3)
    layer.train(dropout > 0)
    x = torch.randn(4, 128, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)  # the same dropout mask: drawn over x's shape, as functional.dropout_mask draws it
    keep = torch.empty(x.shape, dtype=torch.uint8).bernoulli_(1 - dropout).bool() if dropout else \
        torch.ones_like(x).bool()
    update = (torch.where(keep, x / (1 - dropout), 0.0) @ A.T @ B.T) * layer.scaling["default"]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, q(x) + update, atol=1e-6, rtol=0)
    y.sum().backward()  # gradients still reach x and the adapter
    assert x.grad is not None and A.grad is not None and B.grad.abs().sum() > 0


def test_a_float32_model_over_a_bfloat16_compute_merges_into_float32():
    """quantize_model(float32 model, compute_dtype=bfloat16): merge_and_unload's Linears used to come back in
    bfloat16 beside the float32 norms and embeddings, and the merged model failed ("expected m1 and m2 to
    have the same dtype"). They take the model's dtype, as the Linears they replaced had."""
    q = tiny_model()
    quantize_model(q, compute_dtype=torch.bfloat16)
    qlora = get_peft_model(q, LoraConfig(**CFG, init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = qlora(IDS)
        merged = qlora.merge_and_unload()
        assert {p.dtype for p in merged.parameters()} == {torch.float32}
        # the 4-bit matmuls ran in bfloat16, the merged ones run in float32: bfloat16's rounding apart
        torch.testing.assert_close(merged(IDS), expected, atol=0.05, rtol=0.02)
