"""Sequence log-probabilities of a phase's pairs and of sampled answers, under whatever weights the model computes
with (the caller picks them: π_β, the reference, the policy).

``Scorer`` holds the model and the settings of ``BPOModule`` that shape these forwards (chunking of the output head,
shared prompt forwards, the scoring batch size, the EOS convention). Under ZeRO-3 over several processes
(``lockstep``) every forward is collective: each process runs as many as the busiest one, the extra ones on
stand-in inputs whose results are discarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bpo_lightning.batches import pair_batch, response_batch
from bpo_lightning.distributed import Ranks
from bpo_lightning.logprobs import SequenceLogps, chunk_positions, sequence_logps
from bpo_lightning.types import PreferenceRecord


@dataclass
class Scorer:
    model: Any  # the policy module
    tokenizer: Any
    ranks: Ranks
    lockstep: bool = False  # ZeRO-3 over several processes
    chunk_size: int = 32  # model.logprob_chunk_size
    keep_mib: int = 128  # model.logprob_keep_mib
    share_prompts: bool = True  # model.share_prompts
    batch_size: int = 32  # model.scoring_batch_size
    truncated_eos: bool = True  # model.truncated_eos

    def logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Summed response log-probs of a right-padded batch (``batches.right_padded``), with gradients when enabled."""
        device = next(self.model.parameters()).device
        ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        least = 0
        if self.lockstep:  # the output head is called as often on every process
            per_chunk = chunk_positions(self.model, self.chunk_size)
            least = self.ranks.most(math.ceil(int(mask[:, 1:].sum()) / per_chunk))
        return sequence_logps(
            self.model, ids, attn, mask, self.chunk_size, least, self.keep_mib * 2**20, self.share_prompts
        )

    def sums(self, batches) -> list[torch.Tensor]:
        """Summed response log-probs of each batch, in eval mode (no dropout); the training mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            return [self.logps(batch).sums for batch in batches]
        finally:
            self.model.train(was_training)

    def pairs(self, records: list[PreferenceRecord]) -> list[tuple[float, float]]:
        """(chosen, rejected) sequence log-probs of each pair, response + EOS as training scores them."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        chunks = [records[start : start + self.batch_size] for start in range(0, len(records), self.batch_size)]
        real = len(chunks)
        if self.lockstep:  # as many forwards as the busiest process, the extra ones discarded
            stand_in = records[:1] or [PreferenceRecord(0, -1, "", "", "", 0.0, 0.0, [eos], [eos], [eos], 0)]
            chunks += [stand_in] * (self.ranks.most(real) - real)
        out = []
        batches = (pair_batch(c, pad, eos, self.truncated_eos) for c in chunks)
        for chunk, sums in zip(chunks[:real], self.sums(batches), strict=False):
            sums = sums.tolist()  # (2b,): chosen then rejected
            out.extend(zip(sums[: len(chunk)], sums[len(chunk) :], strict=True))
        return out

    def answers(self, samples) -> torch.Tensor:
        """log π(y|x) of sampled answers, (N,) float64 (an EOS is scored where the model emitted it)."""
        batch = response_batch(samples, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        size, n = self.batch_size, len(batch["input_ids"])
        chunks = [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, n, size)]
        real = len(chunks)
        if self.lockstep:  # as many forwards as the busiest process, the extra ones discarded
            chunks += [{k: v[:1] for k, v in batch.items()}] * (self.ranks.most(real) - real)
        return torch.cat([sums.double() for sums in self.sums(chunks)[:real]]).cpu()
