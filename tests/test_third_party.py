"""Zero false alarms on a real third-party training loop: Hugging Face's Trainer with gradient
accumulation, gradient clipping, AdamW and evaluation between steps."""

from __future__ import annotations

import pytest
import torch

import gradwatch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("level", ["full", "light"])
def test_hf_trainer_accumulation_clipping_eval_is_silent(tmp_path, level: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_grad_norm=1.0, num_train_epochs=1, eval_strategy="steps", eval_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens())
    with gradwatch.watch(model, on_anomaly="raise", level=level) as w:
        trainer.train()
    assert w.anomalies == []
    assert w.counts["optimizer_update"] == 4  # 32 samples / (4 x 2 accumulation)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert w.counts["grad_accumulated"] == 8 * n_params  # every micro-batch, every leaf
