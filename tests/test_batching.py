"""Padding and packing, checked against brute-force constructions and against the model itself:
a packed row's logits (Transformer.forward with the 4-D mask and position_ids) must equal each
of its examples run alone."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from minipeft.batching import PackedRow, block_causal_mask, collate, collate_packed, pack
from minipeft.model import attention_mask_4d
from minipeft.templates import IGNORE_INDEX

PAD = 0


def make_examples(lengths, vocab=131, seed=0):
    """(input_ids, labels) pairs: the first third of each is prompt (-100), the rest supervised."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        out.append((ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_to_the_longest(side):
    examples = make_examples([3, 7, 1, 5])
    batch = collate(examples, pad_id=PAD, padding_side=side)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (4, 7) and batch[key].dtype == torch.long
    for b, (ids, labels) in enumerate(examples):
        k = 7 - len(ids)
        fill = lambda row, value: [value] * k + row if side == "left" else row + [value] * k
        assert batch["input_ids"][b].tolist() == fill(ids, PAD)
        assert batch["attention_mask"][b].tolist() == fill([1] * len(ids), 0)
        assert batch["labels"][b].tolist() == fill(labels, IGNORE_INDEX)


def test_collate_errors():
    with pytest.raises(ValueError, match="no examples"):
        collate([], PAD)
    with pytest.raises(ValueError, match=r"examples\[1\]: input_ids has 2 tokens but labels has 1"):
        collate([([1], [1]), ([1, 2], [2])], PAD)
    with pytest.raises(ValueError, match=r"examples\[0\] is empty"):
        collate([([], [])], PAD)
    with pytest.raises(ValueError, match="padding_side"):
        collate([([1], [1])], PAD, padding_side="both")


def test_pack_is_next_fit_and_masks_each_first_label():
    examples = make_examples([3, 4, 2, 6, 1, 7])
    rows = pack(examples, max_length=7)
    assert [r.lengths for r in rows] == [[3, 4], [2], [6, 1], [7]]
    flat_ids = [i for r in rows for i in r.input_ids]
    assert flat_ids == [i for ids, _ in examples for i in ids]  # every token, in order
    flat_labels = [label for r in rows for label in r.labels]
    expected = [label for _, labels in examples for label in [IGNORE_INDEX] + labels[1:]]
    assert flat_labels == expected
    with pytest.raises(ValueError, match=r"examples\[5\] has 7 tokens > max_length 6"):
        pack(examples, max_length=6)


def test_collate_packed_restarts_positions():
    rows = pack(make_examples([3, 2, 4, 5]), max_length=9)
    batch = collate_packed(rows, PAD)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 0, 0, 0]]
    assert batch["input_ids"][1, 5:].tolist() == [PAD] * 4 and batch["labels"][1, 5:].tolist() == [IGNORE_INDEX] * 4
    assert batch["attention_mask"].shape == (2, 1, 9, 9) and batch["attention_mask"].dtype == torch.bool


def brute_force_mask(seq_ids, window=None):
    B, T = seq_ids.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                same = seq_ids[b, i] == seq_ids[b, j] and seq_ids[b, j] >= 0
                inside = window is None or i - j < window
                mask[b, 0, i, j] = (same and j <= i and inside) or i == j
    return mask


@pytest.mark.parametrize("window", [None, 3])
def test_block_causal_mask_matches_brute_force(window):
    rows = [PackedRow([1] * n, [1] * n, lengths) for n, lengths in ((9, [4, 1, 4]), (6, [6]), (3, [2, 1]))]
    seq_ids = torch.tensor([[0, 0, 0, 0, 1, 2, 2, 2, 2], [0] * 6 + [-1] * 3, [0, 0, 1] + [-1] * 6])
    assert torch.equal(block_causal_mask(seq_ids, window), brute_force_mask(seq_ids, window))
    packed = collate_packed(rows, PAD, sliding_window=window)["attention_mask"]  # the same rows, via collate
    assert torch.equal(packed, brute_force_mask(seq_ids, window))


@pytest.mark.parametrize("window", [None, 4])
def test_one_sequence_mask_is_the_models_causal_mask(window):
    T = 7
    ours = block_causal_mask(torch.zeros(2, T, dtype=torch.long), window)
    assert torch.equal(ours, attention_mask_4d(torch.ones(2, T, dtype=torch.long), T, window))


def run_packed(model, batch):
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])


# float32: the same sums over more (masked, zero-weight) keys, rounding only (~1e-6).
# bfloat16 (8-bit mantissa): one ulp is 2^-7 at |logit| in [1, 2); allow two.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_equal_each_example_alone(family, dtype):
    model = tiny_model(family).to(dtype)
    window = model.config.sliding_window  # mistral: 5, shorter than the examples, so it matters
    examples = make_examples([7, 5, 9, 2, 11, 6], vocab=model.config.vocab_size)
    rows = pack(examples, max_length=16)
    assert max(len(r.lengths) for r in rows) > 1
    batch = collate_packed(rows, PAD, sliding_window=window)
    logits = run_packed(model, batch)
    B, T = batch["input_ids"].shape
    one_sequence = {"input_ids": batch["input_ids"], "position_ids": torch.arange(T).expand(B, T),
                    "attention_mask": block_causal_mask(torch.zeros(B, T, dtype=torch.long), window)}
    plain_causal = run_packed(model, one_sequence)
    it = iter(examples)
    leaked = False
    for b, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            ids, _ = next(it)
            alone = model(torch.tensor([ids]))[0]
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(logits[b, start:start + n], alone, atol=tol, rtol=tol)
            leaked |= start > 0 and not torch.allclose(plain_causal[b, start:start + n], alone, atol=10 * tol)
            start += n
    assert leaked  # without the block mask and restarted positions, examples see each other (~0.3 off)


def test_packed_loss_equals_the_sum_of_example_losses():
    model = tiny_model("llama-gqa")
    examples = [(ids, list(ids)) for ids, _ in make_examples([6, 4, 8])]  # every token supervised
    rows = pack(examples, max_length=18)
    assert len(rows) == 1
    batch = collate_packed(rows, PAD)
    with torch.no_grad():
        logits = run_packed(model, batch)
        packed = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum")
        alone = sum(F.cross_entropy(model(torch.tensor([ids]))[0, :-1], torch.tensor(labels[1:]), reduction="sum")
                    for ids, labels in examples)
    # 15 target tokens summed in float32; per-token error ~1e-6.
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    assert (batch["labels"][0, [0, 6, 10]] == IGNORE_INDEX).all()  # no target crosses an example boundary
