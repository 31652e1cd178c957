"""Run by tests/test_trainer_store.py under torchrun: a Trainer on 2 gloo ranks (DDP) with
the gradient store over 16 training rows. ``OUT`` alone: one optimizer step of two
micro-batches, rank 0 saving the initial model beside the store for the test's reference.
``OUT STEPS_PER_CHECKPOINT KILL_AT [RESUME_FROM]``: batches of 2 rows a rank, a checkpoint
every few steps, killed after step KILL_AT (0: never), or resumed from a checkpoint."""

import os
import sys
from pathlib import Path

import torch
from helpers import build_tokenizer, word_rows

from ghostproj.integrations.transformers import GradientStoreCallback


class Kill:
    """Stops every rank at the end of one step, as a kill would (no callback's cleanup)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, event):
        def handler(args, state, control, **kwargs):
            if event == "on_step_end" and state.global_step == self.step:
                # every rank got here, so each one's rows up to the last checkpoint are on disk
                torch.distributed.barrier()
                raise KeyboardInterrupt
        return handler


def main(out: Path, save_steps: int = 0, kill_at: int = 0, resume_from: str | None = None) -> None:
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
    batches = dict(per_device_train_batch_size=2) if save_steps else dict(per_device_train_batch_size=4,
                                                                          gradient_accumulation_steps=2)
    saving = dict(save_strategy="steps", save_steps=save_steps) if save_steps else dict(save_strategy="no")
    args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=1, learning_rate=1e-3, report_to=[],
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                             ddp_backend="gloo", **batches, **saving)
    if args.process_index == 0:
        model.save_pretrained(out / "model")
        dataset.save_to_disk(str(out / "dataset"))
    callbacks = [GradientStoreCallback(out / "store", dataset, rank=16, shard_size=3)] + ([Kill(kill_at)] if kill_at
                                                                                          else [])
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train(resume_from_checkpoint=resume_from)
    # every rank leaves together and at once: gloo's threads, left running at interpreter
    # exit, abort the process now and then, and tearing the group down can hang one rank
    # after the other has gone; everything the test reads is on disk by now
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *map(int, sys.argv[2:4]), *sys.argv[4:5])
