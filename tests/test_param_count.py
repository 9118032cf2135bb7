"""Parameter counts on real model sizes (meta device) and the outline's percentages."""
import subprocess
import sys


from minipeft.param_count import count_method, frozen_weight_bytes
from minipeft.peft_model import format_trainable


def test_outline_claims_on_real_sizes():
    assert format_trainable(*count_method("tinyllama-1.1b", "lora", r=8, target_modules=["q_proj", "v_proj"])) == \
        "trainable params: 1,126,400 || all params: 1,101,174,784 || trainable%: 0.1023"
    trainable, total = count_method("llama-2-7b", "adapter", bottleneck_size=384, placement="houlsby")
    # Houlsby: two adapters per layer, each 2*d*m + m + d = 2*4096*384 + 384 + 4096
    assert trainable == 32 * 2 * (2 * 4096 * 384 + 384 + 4096)
    assert 2.5 < 100 * trainable / total < 3.5  # the outline's "~3%"
    trainable, total = count_method("llama-2-7b", "prefix", num_virtual_tokens=20)
    assert trainable == 20 * 32 * 2 * 4096 and 100 * trainable / total < 1  # P * layers * (k, v) * kv width
    assert count_method("qwen2-0.5b", "prompt", num_virtual_tokens=20)[0] == 20 * 896
    assert count_method("qwen2-0.5b", "full") == (494_032_768, 494_032_768)


def test_nf4_memory_is_about_a_quarter_of_bf16():
    m = frozen_weight_bytes("llama-2-7b")
    # Linears are 96% of llama-2-7b; at 4.127 / 16 bits they shrink ~3.9x, the rest stays bf16.
    assert m["nf4+dq"] < m["nf4"] < m["bf16"]
    assert 0.27 < m["nf4+dq"] / m["bf16"] < 0.30


def test_count_params_command():
    out = subprocess.run([sys.executable, "-m", "minipeft", "count-params", "--preset", "llama-2-7b", "--method",
                          "lora", "--r", "8", "--target-modules", "q_proj,v_proj"], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
