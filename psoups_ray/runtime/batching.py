"""Padding token lists into batches, and the positions and score indices that go with it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_padded(
    rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists padded on the left: (B, L) each, L the
    longest row (decoding continues from the right end)."""
    width = max((len(row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (left padding starts at 0): (B, L)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The position a sequence classifier reads its score from: the last non-pad token.

    The same rule as transformers' ``*ForSequenceClassification``, so scores equal those
    of the reward model as trained. (B, L) -> (B,)
    """
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id).int()).argmax(-1)
