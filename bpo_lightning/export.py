"""Export a trained policy as a plain transformers folder (weights + tokenizer).

    bpo export --run runs/quickstart --out exported/     # last checkpoint of a run
    bpo export --run runs/quickstart --ckpt runs/quickstart/checkpoints/phase-1.ckpt --out exported/

A checkpoint is a ``.ckpt`` file or, from a DeepSpeed run, the folder DeepSpeed writes under that name: its ZeRO
partitions are consolidated first (any number of processes wrote it; the export needs none).

LoRA adapters are merged into the base weights (for an ensemble: the merge of the members, as evaluated), so the
folder loads with ``AutoModelForCausalLM.from_pretrained`` and needs neither PEFT nor bpo-lightning.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
import yaml

from bpo_lightning.files import UMASK, shareable


def export_policy(module, out_dir: str | Path) -> Path:
    """Save ``module``'s current policy into ``out_dir``, complete or not at all: it is written into a temporary
    folder beside ``out_dir`` and renamed into place (a folder already there is replaced). LoRA layers are merged in
    and removed, which changes ``module.policy``: export from a module that is done training (as ``bpo export``
    does)."""
    import shutil

    from bpo_lightning.lora import MERGED
    from bpo_lightning.weights import EnsembleWeights

    out = Path(out_dir)
    model = module.policy
    if module.lora is not None:
        if isinstance(module.weights, EnsembleWeights):
            module.lora.load_merged(model, module.weights.state())
            model = model.merge_and_unload(adapter_names=[MERGED])
        else:
            model = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer = with_bos(module.tokenizer)
        generating_side = tokenizer.padding_side
        tokenizer.padding_side = getattr(tokenizer, "source_padding_side", "right")
        try:  # saved with the source's padding side (right for most), not the left padding batched sampling uses
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.padding_side = generating_side
        shareable(tmp)  # not the 0600 safetensors gives its files
        tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def with_bos(tokenizer):
    """The tokenizer to export: the policy saw BOS before every prompt (samplers prepend it), so a tokenizer whose
    plain ``tokenizer(text)`` leaves BOS out gets a post-processor that adds it — ``tokenizer(prompt)`` plus
    ``generate`` then gives the model the context it was trained on. Others are returned as they are."""
    bos = tokenizer.bos_token
    backend = getattr(tokenizer, "_tokenizer", None)
    if bos is None or backend is None or tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return tokenizer
    from tokenizers.processors import TemplateProcessing

    out = copy.deepcopy(tokenizer)
    out._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return out


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as one dict: a ``.ckpt`` file, or the folder DeepSpeed writes (its ZeRO partitions are
    consolidated into whole float32 weights; the Lightning and bpo state of process 0 come along). Either is read as
    weights only: a file holding other Python objects is refused and none of it runs."""
    from bpo_lightning.checkpoints import checked_load

    path = Path(path)
    if not path.is_dir():
        return checked_load(path, weights_only=True)
    from bpo_lightning.reshard import whole_weights

    return whole_weights(path)


def consolidated(path: str | Path) -> Path:
    """``path`` itself for a checkpoint file; for a DeepSpeed checkpoint folder, a single-file copy beside it
    (``<folder>.consolidated.ckpt``, made once), which any strategy loads."""
    path = Path(path)
    if not path.is_dir():
        return path
    target = path.with_name(path.name + ".consolidated.ckpt")
    if not target.exists() or target.stat().st_mtime < path.stat().st_mtime:
        from bpo_lightning.files import atomic_file

        checkpoint = load_checkpoint(path)
        with atomic_file(target, "wb", key="ckpt_path") as f:
            torch.save(checkpoint, f)
    return target


def module_from_run(run_dir: str | Path, ckpt: str | Path | None = None):
    """Rebuild a run's ``BPOModule`` from its saved ``config.yaml`` and load a checkpoint (default: last)."""
    from jsonargparse import ArgumentParser

    from bpo_lightning.module import BPOModule

    run = Path(run_dir)
    config_path = run / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"--run: {config_path} not found (is {run} a run directory written by `bpo fit`?)")
    ckpt = Path(ckpt) if ckpt else run / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt: {ckpt} not found")
    parser = ArgumentParser()
    parser.add_class_arguments(BPOModule, "model")
    config = parser.parse_object({"model": yaml.safe_load(config_path.read_text())["model"]})
    module = parser.instantiate_classes(config).model
    module.configure_model()
    checkpoint = load_checkpoint(ckpt)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bpo export", description="Export a trained policy as a transformers folder")
    parser.add_argument("--run", required=True, help="run directory (trainer.default_root_dir of `bpo fit`)")
    parser.add_argument("--ckpt", help="checkpoint to export (default: <run>/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        module = module_from_run(args.run, args.ckpt)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"exported to {export_policy(module, args.out)}")
