"""Padded token batches: every tensor batch a model sees is built here from token id lists.

- ``pair_batch`` / ``weighted_pair_batch``: a phase's preference pairs for training and scoring (chosen rows first);
- ``response_batch``: sampled answers for log-probs (evaluation KL);
- ``right_padded``: the right-padded ids, attention and loss masks under all of them;
- ``left_pad``: prompts for ``generate`` (left padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bpo_lightning.types import PreferenceRecord

if TYPE_CHECKING:
    from bpo_lightning.sampling import Samples


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


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` of shape (N, T)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def pair_batch(
    records: list[PreferenceRecord], pad_id: int, eos_id: int, truncated_eos: bool = True
) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences, chosen first then rejected: prompt + response + EOS.

    ``loss_mask`` marks the response tokens and EOS; behavior/reference log-probs come along as (2B,) tensors. A
    response cut at ``max_new_tokens`` gets the EOS term too with ``truncated_eos`` (the paper's convention), none
    without.
    """
    seqs, prompt_lens = [], []
    for side in ("chosen", "rejected"):
        for r in records:
            ended = getattr(r, f"{side}_finished", True) or truncated_eos
            seqs.append(r.prompt_ids + getattr(r, f"{side}_ids") + [eos_id] * ended)
            prompt_lens.append(len(r.prompt_ids))
    batch = right_padded(seqs, prompt_lens, pad_id)

    def both(name: str) -> torch.Tensor:
        values = [getattr(r, f"{name}_chosen_logps") for r in records] + [
            getattr(r, f"{name}_rejected_logps") for r in records
        ]
        return torch.tensor(values, dtype=torch.float32)

    batch["behavior_logps"] = both("behavior")  # (2B,)
    batch["reference_logps"] = both("reference")  # (2B,)
    return batch


def weighted_pair_batch(
    records: list[PreferenceRecord],
    mine: list[int],
    total: int,
    world: int,
    pad_id: int,
    eos_id: int,
    truncated_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """One process's share of a global step of ``total`` pairs over ``world`` processes.

    ``pair_weight`` (B,) is 1 for real pairs and 0 for the stand-in pair of an empty share; ``loss_scale`` is
    ``world / total``: with gradients averaged over processes, Σ_processes (world/total)·Σ_own ℓ / world is the mean
    loss over the step's ``total`` pairs, whatever their split.
    """
    rows = [records[i] for i in mine] or [records[0]]
    batch = pair_batch(rows, pad_id, eos_id, truncated_eos)
    batch["pair_weight"] = torch.tensor([1.0 if mine else 0.0] * len(rows))  # (B,)
    batch["loss_scale"] = torch.tensor(world / total)
    return batch


def response_batch(samples: Samples, pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response sequences of ``samples``, EOS appended where the model emitted it.

    An answer cut at the length limit is scored as that prefix (no EOS): its probability under a model is the
    probability of the prefix, so the KL estimate is over the truncated distributions both models induce.
    """
    seqs, starts = [], []
    for prompt_ids, group, done in zip(samples.prompt_ids, samples.response_ids, samples.finished, strict=True):
        for ids, finished in zip(group, done, strict=True):
            seqs.append(prompt_ids + ids + ([eos_id] if finished else []))
            starts.append(len(prompt_ids))
    return right_padded(seqs, starts, pad_id)
