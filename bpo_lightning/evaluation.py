"""Evaluation against reference answers, and the one-line-per-phase report.

The policy answers held-out prompts greedily; the evaluator scores each answer and the prompt's reference
answer; a win is a strictly higher score (ties are counted apart), as in bpo_spec §5.3.
"""

from __future__ import annotations

import json
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from bpo_lightning.annotation import PairwiseAnnotator
from bpo_lightning.metrics import ResponseStats, WinTieLoss
from bpo_lightning.prompts import model_input
from bpo_lightning.sampling import GenerateSampler


@rank_zero_only
def _say(line: str) -> None:
    print(line, flush=True)  # the report is the run's main output: stdout, once per job


class PhaseReport(L.Callback):
    """Evaluates the policy before training and after every ``eval_every_n_phases`` phases, and prints a line per
    phase: pairs kept/dropped, gold win rate vs the references, mean gold reward, KL(policy‖behavior).

    Args:
        eval_every_n_phases: evaluation frequency in phases (0 disables evaluation).
        max_eval_prompts: evaluate on at most this many held-out prompts.
        batch_size: prompts per ``generate`` call.
        temperature: 0 for greedy decoding (the paper's protocol); > 0 evaluates samples at that temperature
            (top-k 50), with a fixed seed, ``samples_per_prompt`` per prompt, each compared with the reference.
        samples_per_prompt: responses per prompt when sampling.
        plots: draw ``plots/phases.png`` in the run directory after every phase.
    """

    def __init__(
        self,
        eval_every_n_phases: int = 1,
        max_eval_prompts: int | None = None,
        batch_size: int = 64,
        temperature: float = 0.0,
        samples_per_prompt: int = 1,
        plots: bool = True,
    ):
        if temperature == 0 and samples_per_prompt != 1:
            raise ValueError("report.samples_per_prompt must be 1 with greedy decoding (report.temperature: 0)")
        self.eval_every_n_phases = eval_every_n_phases
        self.max_eval_prompts = max_eval_prompts
        self.batch_size = batch_size
        self.temperature = temperature
        self.samples_per_prompt = samples_per_prompt
        self.plots = plots
        self.history: list[dict] = []
        self._reference_scores: torch.Tensor | None = None
        self._phase_start = time.perf_counter()

    def evaluate(self, trainer: L.Trainer, module) -> dict[str, float] | None:
        dm = trainer.datamodule
        rows = dm.eval_rows[: self.max_eval_prompts] if self.max_eval_prompts else dm.eval_rows
        if not rows or self.eval_every_n_phases <= 0:
            return None
        prompts = [r["prompt"] for r in rows]
        inputs = [model_input(r) for r in rows]
        sampler = GenerateSampler(
            num_samples=self.samples_per_prompt, temperature=self.temperature, max_new_tokens=dm.sampler.max_new_tokens,
            batch_size=self.batch_size, max_prompt_tokens=getattr(dm.sampler, "max_prompt_tokens", 512), progress=False,
        )  # fmt: skip
        n = self.samples_per_prompt
        with module.policy_weights():  # an ensemble is evaluated through its merged adapter
            samples = sampler.sample(module.policy, module.tokenizer, inputs, seed=0)
        responses = [r for group in samples.responses for r in group]
        prompts = [p for p in prompts for _ in range(n)]
        references = [r["reference"] for r in rows for _ in range(n)]
        outcome = WinTieLoss()
        if isinstance(dm.evaluator, PairwiseAnnotator):  # a judge: verdict > 0 means the policy's answer wins
            scores = torch.tensor(dm.evaluator.compare(prompts, responses, references), dtype=torch.float64)
            outcome.update(scores, torch.zeros_like(scores))  # no verdict (NaN) is counted as invalid
        else:
            if self._reference_scores is None:  # the references never change: score them once
                self._reference_scores = torch.tensor(dm.evaluator.score(prompts, references), dtype=torch.float64)
            scores = torch.tensor(dm.evaluator.score(prompts, responses), dtype=torch.float64)
            outcome.update(scores, self._reference_scores)
        text = ResponseStats()
        text.update(responses, [f for group in samples.finished for f in group])
        result = {k: v.item() for k, v in outcome.compute().items()}
        stats = {k: v.item() for k, v in text.compute().items()}
        result.update(
            reward=scores.nanmean().item(),
            length=stats["mean_words"],
            repetition=stats["repeated_ngram_rate"],
            eos_rate=stats["eos_rate"],
        )
        if dm.annotator is not dm.evaluator and not isinstance(dm.annotator, PairwiseAnnotator):
            proxy = [s for s in dm.annotator.score(prompts, responses) if s == s]  # what training optimises
            result["proxy_reward"] = sum(proxy) / len(proxy) if proxy else None
        return result

    def save(self, trainer: L.Trainer) -> None:
        """Write ``report.json`` and ``plots/phases.png`` into the run directory (rank zero only)."""
        if trainer.global_rank != 0 or not self.history:
            return
        from bpo_lightning.plots import plot_histories

        run_dir = trainer.datamodule.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "report.json.tmp"
        tmp.write_text(json.dumps(self.history, indent=1))
        tmp.replace(run_dir / "report.json")
        if self.plots:
            plot_histories({run_dir.name: self.history}, run_dir / "plots" / "phases.png")

    def on_fit_start(self, trainer: L.Trainer, module) -> None:
        self._phase_start = time.perf_counter()
        if trainer.ckpt_path is not None:  # resumed: the start was evaluated by the first run; keep its report
            path = trainer.datamodule.run_dir / "report.json"
            self.history = json.loads(path.read_text()) if path.exists() else []
            return
        result = self.evaluate(trainer, module)
        if result is not None:
            self.history.append({"phase": 0, **result})
            self.save(trainer)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"eval/win_rate": result["win_rate"], "eval/reward": result["reward"]}, 0)
            _say(
                f"start     | eval win rate {result['win_rate']:.3f} (ties {result['tie_rate']:.3f}) "
                f"| gold reward {result['reward']:+.3f} | length {result['length']:.1f} words"
            )
        self._phase_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        phase = trainer.current_epoch + 1
        summary = module.phase_summary()
        stats = module.phase_stats
        line = f"phase {phase}/{trainer.datamodule.num_phases} | pairs {stats.describe() if stats else '?'}"
        entry = {"phase": phase, "kl": summary["behavior/kl"], "pairs": stats.kept if stats else None}
        due = self.eval_every_n_phases > 0 and phase % self.eval_every_n_phases == 0
        result = self.evaluate(trainer, module) if due else None
        if result is not None:
            entry.update(result)
            module.log("eval/win_rate", result["win_rate"])
            module.log("eval/reward", result["reward"])
            module.log("eval/tie_rate", result["tie_rate"])
            module.log("eval/length", result["length"])
            module.log("eval/repetition", result["repetition"])
            module.log("eval/eos_rate", result["eos_rate"])
            module.log("eval/reward_diff", result["reward_diff"])
            if result.get("proxy_reward") is not None:
                module.log("eval/proxy_reward", result["proxy_reward"])
            line += f" | eval win rate {result['win_rate']:.3f} | gold reward {result['reward']:+.3f}"
        line += f" | KL(policy‖behavior) {summary['behavior/kl']:.4f} | {time.perf_counter() - self._phase_start:.1f}s"
        self.history = [h for h in self.history if h["phase"] < phase] + [entry]  # a redone phase replaces its entry
        self.save(trainer)
        _say(line)
        self._phase_start = time.perf_counter()  # the next phase's time includes its data collection
