"""The run's report: one line per phase on stdout, ``report.json`` and ``plots/phases.png`` (``PhaseReport``).

The evaluations it reports run in Lightning's validation loop (``evaluation``); this callback adds the evaluation
before the first training step, prints the lines, keeps the history and shows progress bars where Lightning's are off.
"""

from __future__ import annotations

import json
import math
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

from bpo_lightning.files import atomic_write, strict_json
from bpo_lightning.sampling import Sampler


@rank_zero_only
def _say(line: str) -> None:
    print(line, flush=True)  # the report is the run's main output: stdout, once per job


def _describe(result: dict) -> str:
    line = f"eval win rate {result['win_rate']:.3f} (ties {result['tie_rate']:.3f})"
    if "reward" in result:
        line += f" | gold reward {result['reward']:+.3f}"
    for name, label in (("kl_initial", "KL(policy‖initial)"), ("kl_behavior", "KL(policy‖behavior)")):
        if name in result:
            line += f" | {label} {result[name]:.3f}"
            stderr = result.get(f"{name}_stderr")
            if stderr is not None and math.isfinite(stderr):
                line += f" ± {stderr:.3f}"  # standard error of the Monte-Carlo estimate
    return line


class PhaseReport(L.Callback):
    """Prints a line per phase (pairs kept/dropped, evaluation, KL, time) and keeps the run's history in
    ``report.json`` and ``plots/phases.png``.

    Evaluations themselves run in Lightning's validation loop (``BPOModule.validation_step``): every
    ``trainer.check_val_every_n_epoch`` phases, or every ``trainer.val_check_interval`` steps with
    ``trainer.check_val_every_n_epoch: null``. This callback adds the evaluation before the first training step.

    Where Lightning's progress bar is off (``trainer.enable_progress_bar: false``, the recipes' setting), it shows
    its own bars on stderr while a phase trains and while the policy is evaluated, when ``data.sampler``'s
    ``progress`` is on (the setting of every progress bar of a run).

    Args:
        evaluate_at_start: evaluate the initial policy before training (phase 0 of the history).
        plots: draw ``plots/phases.png`` in the run directory when the fit ends (``report.json`` is written after every
            evaluation).
    """

    def __init__(self, evaluate_at_start: bool = True, plots: bool = True) -> None:
        self.evaluate_at_start = evaluate_at_start
        self.plots = plots
        self.history: list[dict] = []
        self._pending: dict | None = None  # the evaluation at the end of the current phase
        self._phase_start = time.perf_counter()
        self._bar: tqdm | None = None
        self._paused: tuple | None = None  # the training bar's place while an evaluation inside the phase runs

    # -- progress bars ---------------------------------------------------------------------------------------------

    @staticmethod
    def _show_bars(trainer: L.Trainer) -> bool:
        from bpo_lightning.data import OnlineDataModule

        data = trainer.datamodule
        sampler = data.sampler if isinstance(data, OnlineDataModule) else None
        own = trainer.progress_bar_callback is None  # Lightning's bar, where on, already shows the loops
        return own and trainer.global_rank == 0 and isinstance(sampler, Sampler) and sampler.progress

    def _open_bar(self, trainer: L.Trainer, total, desc: str, unit: str = "batch", initial: int = 0) -> None:
        self._close_bar()
        if self._show_bars(trainer):
            total = int(total) if total is not None and math.isfinite(total) else None
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def _advance_bar(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _counted(self, batches):
        for batch in batches:
            yield batch
            self._advance_bar()

    @staticmethod
    def _evaluation_name(trainer: L.Trainer) -> str:
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        return f"phase {trainer.current_epoch + 1}: evaluating" if fn == "fit" else f"{fn}: evaluating"

    def on_train_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._open_bar(trainer, trainer.num_training_batches, f"phase {trainer.current_epoch + 1}: training", "step")

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        self._advance_bar()

    def on_validation_epoch_start(self, trainer: L.Trainer, module) -> None:
        if self._bar is not None and self._bar.total is not None and self._bar.n < self._bar.total:
            self._paused = (self._bar.total, self._bar.desc, self._bar.unit, self._bar.n)  # resumed after it
        if not trainer.sanity_checking:
            self._open_bar(trainer, sum(trainer.num_val_batches), self._evaluation_name(trainer))

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._advance_bar()

    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._close_bar()
        if self._paused is not None:
            total, desc, unit, done = self._paused
            self._paused = None
            self._open_bar(trainer, total, desc, unit, initial=done)

    def on_test_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._open_bar(trainer, sum(trainer.num_test_batches), self._evaluation_name(trainer))

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._advance_bar()

    def on_test_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._close_bar()

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        self._close_bar()
        self._paused = None
        self.draw(trainer)  # what the run has so far

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        self.draw(trainer)

    # -- the report ------------------------------------------------------------------------------------------------

    def save(self, trainer: L.Trainer) -> None:
        """Write ``report.json`` into the run directory (rank zero only), after every evaluation."""
        if trainer.global_rank != 0 or not self.history:
            return
        run_dir = trainer.datamodule.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "report.json", json.dumps(strict_json(self.history), indent=1, allow_nan=False))

    def draw(self, trainer: L.Trainer) -> None:
        """``plots/phases.png`` from the history, once at the end of the fit (or when it stops): drawing is not on the
        training path (``bpo compare`` draws any run's report at any time)."""
        if trainer.global_rank != 0 or not self.history or not self.plots:
            return
        from bpo_lightning.plots import plot_histories

        run_dir = trainer.datamodule.run_dir
        plot_histories({run_dir.name: self.history}, run_dir / "plots" / "phases.png")

    def _record(self, trainer: L.Trainer, entry: dict) -> None:
        # evaluations arrive in order: entries at or after this point come from an interrupted earlier attempt
        self.history = [h for h in self.history if h["phase"] < entry["phase"]] + [entry]
        self.save(trainer)

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        # not on_fit_start: with DeepSpeed, Lightning restores a checkpoint only after on_fit_start, so only here
        # does every strategy know whether this fit resumes
        self._phase_start = time.perf_counter()
        if trainer.ckpt_path is not None:  # resumed: the start was evaluated by the first run; keep its report
            path = trainer.datamodule.run_dir / "report.json"
            self.history = json.loads(path.read_text()) if path.exists() else []
            return
        dm = trainer.datamodule
        if not self.evaluate_at_start or not dm.eval_rows:
            return
        batches = dm.eval_batches(trainer.global_rank, trainer.world_size)
        self._open_bar(trainer, len(batches), "start: evaluating")
        result = module.evaluate(self._counted(batches), dm.evaluation_inputs(), stage="start")
        self._close_bar()
        self._record(trainer, {"phase": 0, "step": 0, **result})
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"eval/{k}": v for k, v in result.items()}, step=0)
        _say(f"start     | {_describe(result)} | length {result['length']:.1f} words")
        self._phase_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or module.last_evaluation is None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        total = max(trainer.num_training_batches, 1) if math.isfinite(trainer.num_training_batches) else None
        done = epoch_loop.batch_progress.current.completed
        at_end = total is None or done >= total
        phase = trainer.current_epoch + (1.0 if at_end else done / total)
        entry = {"phase": round(phase, 4), "step": trainer.global_step, **module.last_evaluation}
        if at_end:
            self._pending = entry  # printed and recorded with the phase's line
            return
        self._record(trainer, entry)
        where = f"phase {trainer.current_epoch + 1}/{trainer.datamodule.num_phases} at {done / total:.0%}"
        _say(f"step {trainer.global_step:<5}| {where} | {_describe(entry)}")

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._close_bar()
        phase = trainer.current_epoch + 1
        summary = module.phase_summary()
        stats = module.phase_stats
        line = f"phase {phase}/{trainer.datamodule.num_phases} | pairs {stats.describe() if stats else '?'}"
        entry = {
            "phase": phase,
            "step": trainer.global_step,
            "kl": summary["behavior/kl"],
            "pairs": stats.kept if stats else None,
        }
        if self._pending is not None:
            entry.update({k: v for k, v in self._pending.items() if k not in ("phase", "step")})
            line += f" | {_describe(self._pending)}"
            self._pending = None
        else:  # no evaluation this phase: the training-time estimate on the phase's pairs
            line += f" | KL(policy‖behavior) {summary['behavior/kl']:.4f} (train pairs)"
        line += f" | {time.perf_counter() - self._phase_start:.1f}s"
        self._record(trainer, entry)
        _say(line)
        self._phase_start = time.perf_counter()  # the next phase's time includes its data collection
