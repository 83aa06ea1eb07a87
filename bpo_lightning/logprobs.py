"""Sequence log-probabilities of responses, computed without a full-vocabulary float32 log-softmax.

log π(y|x) is the sum of the response tokens' log-probabilities (the prompt is masked; the response ends with
EOS), bpo_spec §2.1. Real vocabularies reach 150k+ entries, so the per-token normaliser (logsumexp) is computed
over chunks of positions: peak extra memory is (N, chunk, V) floats instead of (N, T, V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceLogps:
    """Summed log-probabilities and the number of scored tokens per sequence, both (N,)."""

    sums: torch.Tensor
    counts: torch.Tensor

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """log softmax(logits)[target] for every position, chunked over positions.

    Args:
        logits: (N, T, V) next-token logits, any float dtype.
        targets: (N, T) token ids to score.
        chunk_size: positions per chunk; each chunk upcasts (N, chunk, V) to float32.

    Returns:
        (N, T) float32 log-probabilities.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[1], chunk_size):
        chunk = logits[:, start : start + chunk_size].float()  # (N, c, V)
        picked = chunk.gather(-1, targets[:, start : start + chunk_size, None]).squeeze(-1)  # (N, c)
        out[:, start : start + chunk_size] = picked - chunk.logsumexp(-1)
    return out


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (N, T), right-padded prompt + response + EOS
    attention_mask: torch.Tensor,  # (N, T)
    loss_mask: torch.Tensor,  # (N, T), 1 on response tokens (incl. EOS)
    chunk_size: int = 128,
) -> SequenceLogps:
    """Summed response log-probabilities of a causal LM."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
    logps = token_logps(logits[:, :-1], input_ids[:, 1:], chunk_size)  # position t predicts token t+1
    mask = loss_mask[:, 1:].to(logps.dtype)
    return SequenceLogps((logps * mask).sum(-1), mask.sum(-1))


def right_padded(sequences: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids``, ``attention_mask`` and ``loss_mask`` (N, T); ``loss_mask``
    marks each sequence's tokens from ``starts[i]`` on (the response: prompt tokens come before)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        loss_mask[row, start : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
