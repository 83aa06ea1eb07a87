"""Run identity: a fingerprint of everything that shapes a run's phase data and its training.

``bpo fit`` records it in ``<run_dir>/run.json`` and refuses to write into a run directory whose recorded run had
other settings, naming every key that differs, before anything in the directory is touched: saved phase data
(pairs, behavior log-probs) are only ever reused by the run that made them. The annotation cache is keyed by exact
texts and stays shareable across runs (``data.annotation_cache``).

What counts: the policy (its source and settings, and for a local folder a digest of its weight files), LoRA, the
behavior rule, the reference, the loss and its arguments, the optimizer and schedule, the prompt source, the
annotator, the sampler, the budget, phases, batch size and seed, and the trainer settings that change the
weights (precision, gradient clipping, accumulation). What does not count: evaluation settings, logging, progress
bars, where files go, and how the work is spread over devices (the result does not depend on it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# dotted-key prefixes that shape neither the phase data nor the trained weights
IGNORED = (
    "model.evaluation",
    "model.offload_snapshots",
    "model.gather_for_sampling",
    "model.logprob_chunk_size",
    "model.logprob_keep_mib",
    "model.share_prompts",
    "model.scoring_batch_size",
    "model.lora.init_args.recompute_members",
    "data.eval_prompts",
    "data.test_prompts",
    "data.evaluator",
    "data.max_eval_prompts",
    "data.eval_batch_size",
    "data.run_dir",
    "data.annotation_cache",
    "data.pipeline",
)
# components whose own arguments may not be provenance (``RecordsArguments.not_provenance``, read from their class)
COMPONENTS = ("data.sampler", "data.annotator")
TRAINER_KEYS = ("precision", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")
FILE = "run.json"


def _flatten(value, prefix: str, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = json.loads(json.dumps(value, default=str))  # lists, tuples, paths: plain JSON values
    return out


def fingerprint(config) -> dict:
    """Dotted keys → values of a parsed ``bpo fit`` config (a jsonargparse ``Namespace``) that shape the run."""
    plain = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    flat = _flatten({"model": plain.get("model", {}), "data": plain.get("data", {})}, "", {})
    flat = {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in IGNORED)}
    for key in COMPONENTS:
        skip = {f"{key}.init_args.{name}" for name in _not_provenance(flat.get(f"{key}.class_path"))}
        flat = {k: v for k, v in flat.items() if k not in skip}
    trainer = plain.get("trainer") or {}
    flat.update({f"trainer.{k}": trainer.get(k) for k in TRAINER_KEYS})
    flat["seed_everything"] = plain.get("seed_everything")
    folder = flat.get("model.policy.init_args.name_or_path")
    if isinstance(folder, str) and Path(folder).expanduser().is_dir():
        flat["model.policy.weights"] = weights_digest(Path(folder).expanduser())
    return flat


def weights_digest(folder: Path) -> str:
    """A digest of a model folder's weight and config files: names, sizes and their first MiB (cheap for large
    files, and any retrained or converted weights change it)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json", ".gguf", ".pt"):
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def differences(saved: dict, current: dict) -> list[str]:
    """``key: saved …, now …`` for every key whose value differs. Class paths are compared by the class they name,
    so a run folder written before a class moved (or that names it by another import path) still matches."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k) and not _same_class(k, saved.get(k), current.get(k))
    ]


def not_provenance_key(key: str, current: dict) -> bool:
    """Whether ``key`` (of a run.json written by an earlier version) is an argument the current fingerprint leaves
    out as not provenance: such a run folder is not refused for it."""
    for component in COMPONENTS:
        prefix = f"{component}.init_args."
        if key.startswith(prefix):
            return key.removeprefix(prefix).split(".")[0] in _not_provenance(current.get(f"{component}.class_path"))
    return False


def _not_provenance(class_path) -> frozenset[str]:
    from bpo_lightning.arguments import NOT_PROVENANCE, not_provenance

    try:
        return not_provenance(_resolve(class_path)) if isinstance(class_path, str) else NOT_PROVENANCE
    except (ImportError, AttributeError, ValueError):
        return NOT_PROVENANCE


def _resolve(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _same_class(key: str, saved, current) -> bool:
    if not key.endswith("class_path") or not isinstance(saved, str) or not isinstance(current, str):
        return False
    try:
        return _resolve(saved) is _resolve(current)
    except (ImportError, AttributeError, ValueError):  # a class that no longer imports is another setting
        return False


def check_run_dir(run_dir: str | Path, current: dict) -> None:
    """Refuse a run directory that holds a run with other settings; record ``current`` in a new one.

    Raises:
        RunMismatch: naming the directory and every differing key.
    """
    path = Path(run_dir) / FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunMismatch(
                f"{path} is damaged ({err}); move it away or choose another --trainer.default_root_dir"
            ) from None
        saved = {k: v for k, v in saved.items() if k in current or not not_provenance_key(k, current)}
        diff = differences(saved, current)
        if diff:
            raise RunMismatch(
                f"{Path(run_dir)} holds a run with other settings, whose saved phase data would be reused:\n  "
                + "\n  ".join(diff)
                + "\nChoose another --trainer.default_root_dir for a new run, or resume the saved run with its own "
                f"config ({Path(run_dir) / 'config.yaml'})."
            )
        return
    from bpo_lightning.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"fingerprint": current}, indent=1, sort_keys=True))


class RunMismatch(RuntimeError):
    """A run directory holds a run with other settings."""
