"""Training batches: padding rendered examples, and packing several examples into one row.

collate: B examples (input_ids, labels) -> tensors (B, T), T = longest example:
    input_ids       padded with pad_id
    attention_mask  1 on real tokens, 0 on padding
    labels          padded with -100 (ignored by the loss; the pad id itself never becomes a target)

Packing: short examples share a row of at most max_length tokens, so no compute is spent on
padding, but each must still see only itself. A packed row of examples e_0, e_1, ... gets
    position_ids    0..len(e_k)-1 for each example: the very angles it gets alone (RoPE scores
                    depend on j - i only, but cos/sin of large positions round differently),
                    and the convention of transformers' DataCollatorWithFlattening
    seq_ids         k on e_k's tokens, -1 on padding
    mask (B,1,T,T)  mask[b, 0, i, j] = seq_ids[b, i] == seq_ids[b, j] >= 0 and j <= i
                    (and i - j < sliding_window for Mistral)
a block-diagonal causal mask (True = may attend, the boolean convention of
torch.nn.functional.scaled_dot_product_attention). A padding query attends to itself only, so
its softmax stays finite; its output is never used. The first label of every example is -100:
in a packed row the previous example's last token would otherwise be trained to predict it.
`Transformer.forward(input_ids, attention_mask=mask, position_ids=...)` takes the 4-D mask as
is; a packed row's logits then equal each example's logits computed alone (tests/test_batching.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
Example = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels) as templates.render returns


def _check(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("no examples to batch")
    for i, (ids, labels) in enumerate(examples):
        if len(ids) != len(labels):
            raise ValueError(f"examples[{i}]: input_ids has {len(ids)} tokens but labels has {len(labels)}")
        if not ids:
            raise ValueError(f"examples[{i}] is empty")


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Rows of ints -> (B, T) int64, T = longest row, filled with `value` on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        out[b, cols] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def collate(examples: Sequence[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples to the longest: {"input_ids", "attention_mask", "labels"}, each (B, T) int64."""
    _check(examples)
    return {
        "input_ids": pad_rows([ids for ids, _ in examples], pad_id, padding_side),
        "attention_mask": pad_rows([[1] * len(ids) for ids, _ in examples], 0, padding_side),
        "labels": pad_rows([labels for _, labels in examples], IGNORE_INDEX, padding_side),
    }


class PackedRow(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    lengths: list[int]  # the examples' lengths, in row order


def pack(examples: Sequence[Example], max_length: int) -> list[PackedRow]:
    """Next-fit packing: examples in order fill a row until the next one does not fit.

    Order is kept (a shuffled dataset stays shuffled); every row holds at most max_length tokens.
    """
    _check(examples)
    rows: list[PackedRow] = []
    for i, (ids, labels) in enumerate(examples):
        if len(ids) > max_length:
            raise ValueError(f"examples[{i}] has {len(ids)} tokens > max_length {max_length}; "
                             "render with max_length first")
        if not rows or len(rows[-1].input_ids) + len(ids) > max_length:
            rows.append(PackedRow([], [], []))
        row = rows[-1]
        row.input_ids.extend(ids)
        row.labels.extend([IGNORE_INDEX, *labels[1:]])
        row.lengths.append(len(ids))
    return rows


def block_causal_mask(seq_ids: torch.Tensor, sliding_window: Optional[int] = None) -> torch.Tensor:
    """seq_ids (B, T), -1 on padding -> boolean mask (B, 1, T, T), True where query i sees key j.

    sliding_window (Mistral's config field): query i also needs i - j < sliding_window.
    """
    T = seq_ids.shape[1]
    i = torch.arange(T, device=seq_ids.device)[:, None]
    j = torch.arange(T, device=seq_ids.device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, None, :] >= 0)
    return ((same & allowed) | (i == j))[:, None]


def collate_packed(rows: Sequence[PackedRow], pad_id: int,
                   sliding_window: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Packed rows -> {"input_ids", "labels", "position_ids"} (B, T) int64 and
    "attention_mask" (B, 1, T, T) bool, right-padded to the longest row."""
    if not rows:
        raise ValueError("no rows to batch")
    positions = [[p for n in r.lengths for p in range(n)] for r in rows]
    seq_ids = [[k for k, n in enumerate(r.lengths) for _ in range(n)] for r in rows]
    return {
        "input_ids": pad_rows([r.input_ids for r in rows], pad_id),
        "labels": pad_rows([r.labels for r in rows], IGNORE_INDEX),
        "position_ids": pad_rows(positions, 0),
        "attention_mask": block_causal_mask(pad_rows(seq_ids, -1), sliding_window),
    }
