"""Other architectures and chat prompts: a Llama-style policy trained on chat-message prompts, end to end."""

import json

import lightning as L
import pytest
from conftest import CountingAnnotator
from transformers import AutoTokenizer

from bpo_lightning.data import OnlineDataModule
from bpo_lightning.module import BPOModule
from bpo_lightning.policy import FromConfig
from bpo_lightning.prompts import PromptSource
from bpo_lightning.sampling import GenerateSampler, encode_prompt
from bpo_lightning.store import PhaseStore

TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}<|bos|>assistant :"


@pytest.fixture
def chat_tokenizer_dir(tmp_path, sft_dir):
    tok = AutoTokenizer.from_pretrained(sft_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_chat_messages_use_the_chat_template(chat_tokenizer_dir, sft_dir):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    messages = [{"role": "user", "content": "hotel review : we stayed here ."}]
    ids = encode_prompt(tok, messages, max_tokens=64)
    assert tok.decode(ids) == "<|bos|>user : hotel review : we stayed here .\n<|bos|>assistant :"
    with pytest.raises(ValueError, match="model.policy: prompts are chat messages but the tokenizer has no chat"):
        encode_prompt(AutoTokenizer.from_pretrained(sft_dir), messages, max_tokens=64)


@pytest.mark.slow
def test_llama_policy_on_chat_prompts(tmp_path, chat_tokenizer_dir):
    rows = [
        {"messages": [{"role": "user", "content": f"hotel review : night {i} was fine ."}], "reference": " ok ."}
        for i in range(16)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = PromptSource(str(tmp_path / "chat.jsonl"), prompt_field="messages")
    loaded = source.load("data.prompts")
    assert (
        loaded[0]["prompt"] == "user: hotel review : night 0 was fine ."
        and loaded[0]["messages"] == rows[0]["messages"]
    )
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 768,
    }
    module = BPOModule(policy=FromConfig(config, tokenizer=str(chat_tokenizer_dir)), lr=1e-3)
    annotator = CountingAnnotator()
    data = OnlineDataModule(
        prompts=source,
        annotator=annotator,
        budget=16,
        num_phases=1,
        batch_size=4,
        sampler=GenerateSampler(max_new_tokens=8, batch_size=8, progress=False),
    )
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, reload_dataloaders_every_n_epochs=1, logger=False,
                        default_root_dir=str(tmp_path / "run"), enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert type(module.policy).__name__ == "LlamaForCausalLM"
    assert data.stats[0].prompts == 16 and trainer.global_step > 0
    records = PhaseStore(tmp_path / "run" / "data", 0).load_pairs()[0]
    tok = module.tokenizer
    assert tok.decode(records[0].prompt_ids).endswith("<|bos|>assistant :")  # sampled from the chat-templated prompt
    assert all(p.startswith("user: hotel review") for p in annotator.calls)  # annotators see the plain text view
