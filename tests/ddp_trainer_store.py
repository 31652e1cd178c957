"""Run by tests/test_trainer_store.py under torchrun: a Trainer on 2 gloo ranks (DDP) with
the gradient store, one optimizer step over the 16 training rows. Rank 0 saves the initial
model beside the store, for the test's reference."""

import sys
from pathlib import Path

import torch
from helpers import build_tokenizer, word_rows

from ghostproj.integrations.transformers import GradientStoreCallback


def main(out: Path) -> None:
    import datasets
    from transformers import (
        DataCollatorForLanguageModeling,
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
    )

    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    rows = [tokenizer(r["text"])["input_ids"][:20] for r in word_rows(16, 7, 2, 9)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=1e-3, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0, ddp_backend="gloo")
    if args.process_index == 0:
        model.save_pretrained(out / "model")
        dataset.save_to_disk(str(out / "dataset"))
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      callbacks=[GradientStoreCallback(out / "store", dataset, rank=16)],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
