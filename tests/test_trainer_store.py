"""The training-time gradient store inside transformers.Trainer: the vectors stored at step
t equal `project`'s on the step-t model (also with gradient accumulation), training is
unchanged by the callback, and the windows are ordinary runs."""

import copy

import pytest
import torch
from helpers import needs_torchrun, rel_err, torchrun, word_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostproj import GradProjectionEngine
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.errors import GhostprojError
from ghostproj.scoring import load_projections
from ghostproj.store.reader import open_run

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

RANK = 16


def gpt2_without_dropout(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    rows = [tokenizer(r["text"])["input_ids"][:20] for r in word_rows(24, 7, 2, 9)]
    return datasets.Dataset.from_dict({"input_ids": rows})


def train(tmp_path, tokenizer, dataset, callbacks, accumulation=1, steps=None, model=None):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = model or gpt2_without_dropout(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, num_train_epochs=1,
                             max_steps=steps or -1, learning_rate=1e-3, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    return model


class Snapshots(transformers.TrainerCallback):
    """The model's weights at the start of every step: the model each step's gradient is of."""

    def __init__(self):
        self.states = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())


def project_rows(model, dataset, rows, pad_id=0):
    """`project`'s vectors (per-example mean loss) of dataset rows on ``model``."""
    engine = GradProjectionEngine(model, rank=RANK)
    ids = [torch.tensor(dataset[r]["input_ids"]) for r in rows]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    labels = torch.full((len(ids), width), -100)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(x)] = x, 1, x
    model.eval()
    with engine:
        losses, _ = causal_lm_losses(model(input_ids=input_ids, attention_mask=mask).logits, labels, "mean")
        losses.sum().backward()
        return engine.collect()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stored_vectors_are_project_on_the_step_model(tmp_path, tokenizer, dataset, monkeypatch, accumulation):
    from ghostproj.integrations.transformers import GradientStoreCallback
    from ghostproj.store.writer import RunWriter

    store = GradientStoreCallback(tmp_path / "store", dataset, rank=RANK)
    snaps, written = Snapshots(), []
    real_add = RunWriter.add

    def recording(self, grads, index, loss, tokens, start=None):
        written.append((store.store.step, index.clone(), grads.clone()))
        return real_add(self, grads, index, loss, tokens, start)
    monkeypatch.setattr(RunWriter, "add", recording)
    train(tmp_path, tokenizer, dataset, [snaps, store], accumulation=accumulation)
    assert len(written) == len(dataset) // 4  # every micro-batch of the epoch
    for step, index, grads in written:
        model = gpt2_without_dropout(len(tokenizer))
        model.load_state_dict(snaps.states[step])
        ref = project_rows(model, dataset, index.tolist())
        assert rel_err(grads, ref) <= 1e-5, (step, rel_err(grads, ref))
    run = load_projections(store.windows[0])  # an ordinary, complete run of every training row once
    assert sorted(run.index.tolist()) == list(range(len(dataset)))
    assert open_run(store.windows[0]).manifest.complete


def test_training_is_unchanged_by_the_store(tmp_path, tokenizer, dataset):
    from ghostproj.integrations.transformers import GradientStoreCallback

    plain = train(tmp_path / "a", tokenizer, dataset, [], accumulation=2)
    watched = train(tmp_path / "b", tokenizer, dataset, [GradientStoreCallback(tmp_path / "store", dataset,
                                                                                rank=RANK)], accumulation=2)
    for (name, p), q in zip(plain.named_parameters(), watched.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), name


def test_bad_configurations_are_one_sentence(tmp_path, tokenizer, dataset):
    from ghostproj.integrations.transformers import GradientStoreCallback

    twice = datasets.Dataset.from_dict({"input_ids": [dataset[0]["input_ids"], dataset[0]["input_ids"]]})
    with pytest.raises(GhostprojError, match="same token ids"):
        GradientStoreCallback(tmp_path / "s", twice)
    with pytest.raises(GhostprojError, match="every must be at least 1"):
        GradientStoreCallback(tmp_path / "s", dataset, every=0)


def test_every_other_step_and_sum_reduction(tmp_path, tokenizer, dataset, monkeypatch):
    """every=2 stores the even steps' rows (a window of a subset, still an ordinary run), and
    loss_reduction='sum' stores the gradient of the example's summed token losses."""
    from ghostproj.integrations.transformers import GradientStoreCallback

    store = GradientStoreCallback(tmp_path / "store", dataset, rank=RANK, every=2, loss_reduction="sum")
    snaps = Snapshots()
    train(tmp_path, tokenizer, dataset, [snaps, store])
    run = load_projections(store.windows[0])
    assert len(run.index) == len(dataset) // 2  # steps 0, 2 and 4 of 6, four rows each
    model = gpt2_without_dropout(len(tokenizer))
    model.load_state_dict(snaps.states[0])
    first = run.index[:4].tolist()  # the rows of step 0 come first
    mean = project_rows(model, dataset, first)
    counts = torch.tensor([len(dataset[r]["input_ids"]) - 1 for r in first], dtype=torch.float32)
    assert rel_err(run.grads[:4], mean * counts[:, None]) <= 1e-5


class Kill(transformers.TrainerCallback):
    """Stops the process's training at a step, as a kill would (nothing after it runs)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def clean_window(tmp_path_factory, tokenizer, dataset):
    from ghostproj.integrations.transformers import GradientStoreCallback

    root = tmp_path_factory.mktemp("clean")
    clean = GradientStoreCallback(root / "store", dataset, rank=RANK)
    train(root, tokenizer, dataset, [clean])
    want = load_projections(clean.windows[0])
    return want.grads[torch.argsort(want.index)]


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(save_steps=st.integers(1, 3), shard_size=st.integers(1, 7), data=st.data())
def test_a_killed_training_resumed_from_a_checkpoint_continues_the_store(tmp_path_factory, tokenizer, dataset,
                                                                         clean_window, save_steps, shard_size, data):
    """Killed at any step after a checkpoint, resumed from the latest one: rows of the steps
    after it that reached the disk are dropped, the resumed steps add theirs, and the window
    holds every row once, equal to an uninterrupted run's."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from ghostproj.integrations.transformers import GradientStoreCallback

    steps = len(dataset) // 4
    killed_at = data.draw(st.integers(save_steps, steps - 1), label="killed_at")
    resume_from = killed_at // save_steps * save_steps
    root = tmp_path_factory.mktemp("killed")

    def trainer(callbacks):
        args = TrainingArguments(output_dir=str(root / "ckpt"), per_device_train_batch_size=4, num_train_epochs=1,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=save_steps,
                                 logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0)
        return Trainer(model=gpt2_without_dropout(len(tokenizer)), args=args, train_dataset=dataset,
                       callbacks=callbacks, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))

    first = GradientStoreCallback(root / "store", dataset, rank=RANK, shard_size=shard_size)
    with pytest.raises(KeyboardInterrupt):
        trainer([first, Kill(killed_at)]).train()
    again = GradientStoreCallback(root / "store", dataset, rank=RANK, shard_size=shard_size)
    trainer([again]).train(resume_from_checkpoint=str(root / "ckpt" / f"checkpoint-{resume_from}"))
    got = load_projections(again.windows[0])
    assert sorted(got.index.tolist()) == list(range(len(dataset)))
    assert rel_err(got.grads[torch.argsort(got.index)], clean_window) <= 1e-5
    assert open_run(again.windows[0]).manifest.complete


def test_in_run_values_inside_the_trainer_equal_ghostproj_inrun(tmp_path, tokenizer, monkeypatch):
    """InRunValuationTrainer against `ghostproj inrun`'s step (jobs.retrain.in_run_step) on
    the batches the Trainer drew, SGD at a constant rate, rows of one length (where the
    Trainer's token mean and inrun's example mean are the same loss up to the count the
    Trainer divides by, ``num_items_in_batch``, which the reference's step size follows)."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from ghostproj.data.batching import Example
    from ghostproj.engines.dotprod import GradDotProdEngine
    from ghostproj.integrations.transformers import InRunValuationTrainer
    from ghostproj.jobs.retrain import in_run_step

    g = torch.Generator().manual_seed(3)
    rows = torch.randint(1, len(tokenizer), (19, 10), generator=g).tolist()  # distinct rows of one length
    train_set = datasets.Dataset.from_dict({"input_ids": [list(r) for r in rows[:16]]})
    val_set = datasets.Dataset.from_dict({"input_ids": [list(r) for r in rows[16:19]]})
    drawn, divisors = [], []
    real_rows, real_loss = InRunValuationTrainer._rows, InRunValuationTrainer.compute_loss
    monkeypatch.setattr(InRunValuationTrainer, "_rows",
                        lambda self, ids, mask: drawn.append(real_rows(self, ids, mask)) or drawn[-1])

    def loss_recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        divisors.append(float(num_items_in_batch))
        return real_loss(self, model, inputs, return_outputs, num_items_in_batch)
    monkeypatch.setattr(InRunValuationTrainer, "compute_loss", loss_recording)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                             weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             seed=0, dataloader_num_workers=0)
    trained = gpt2_without_dropout(len(tokenizer))
    trainer = InRunValuationTrainer(model=trained, args=args, train_dataset=train_set, validation_dataset=val_set,
                                    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()

    model = gpt2_without_dropout(len(tokenizer)).train()
    engine = GradDotProdEngine(model, val_batch_size=len(val_set), loss_reduction="sum").attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    values = torch.zeros(len(train_set), dtype=torch.float64)
    val = [Example(100 + j, val_set[j]["input_ids"]) for j in range(len(val_set))]
    for chosen, divisor in zip(drawn, divisors):
        batch = [Example(int(i), train_set[int(i)]["input_ids"]) for i in chosen] + val
        optimizer.param_groups[0]["lr"] = 0.05 * len(chosen) * 9 / divisor  # the Trainer's loss: token sums / divisor
        _, dots = in_run_step(model, engine, optimizer, batch, 0, "cpu")
        values.index_add_(0, chosen, -0.05 * dots)
    engine.detach()
    assert len(drawn) == 4 and sorted(torch.cat(drawn).tolist()) == list(range(len(train_set)))
    assert (trainer.in_run_values - values).norm() <= 1e-4 * values.norm()
    assert trainer.in_run_counts.tolist() == [1] * len(train_set)
    from safetensors.torch import load_file

    saved = load_file(str(trainer.save_in_run_values(tmp_path / "values") / "values.safetensors"))
    assert torch.equal(saved["value"], trainer.in_run_values.float()) and saved["count"].tolist() == [1] * 16
    with pytest.raises(GhostprojError, match="already"):
        trainer.save_in_run_values(tmp_path / "values")  # never over what is there
    for p, q in zip(trained.parameters(), model.parameters()):  # the optimizer saw the training rows only
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_the_store_in_a_plain_training_loop(tmp_path, tokenizer, dataset):
    """The loop of one's own: HF's token-mean loss, two micro-batches per step (collect() after
    each backward), an ordinary run at the end; each step's rows are project's vectors on that
    step's model."""
    from transformers import DataCollatorForLanguageModeling

    from ghostproj.integrations.transformers import GradientStore

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = gpt2_without_dropout(len(tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    store = GradientStore(model, tmp_path / "store", dataset, rank=RANK)
    store.open_window(0)
    order, states = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1)).tolist(), []
    for step in range(3):
        states.append(copy.deepcopy(model.state_dict()))
        micro = [order[8 * step:8 * step + 4], order[8 * step + 4:8 * step + 8]]
        with store.observing(step):
            for rows in micro:  # the step's loss is the token mean over both micro-batches' labels
                batch = collate([dataset[r] for r in rows])
                tokens = sum(int((collate([dataset[r] for r in m])["labels"][:, 1:] != -100).sum()) for m in micro)
                out = model(**batch)
                loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:]
                                                         .flatten(), ignore_index=-100, reduction="sum") / tokens
                loss.backward()
                store.collect()
        optimizer.step()
        optimizer.zero_grad()
        store.mark_step(step + 1)
    store.close()
    run = load_projections(store.windows[0])
    assert run.index.tolist() == order[:24] and open_run(store.windows[0]).manifest.data["count"] == 24
    for step in range(3):
        reference = gpt2_without_dropout(len(tokenizer))
        reference.load_state_dict(states[step])
        ref = project_rows(reference, dataset, order[8 * step:8 * step + 8])
        assert rel_err(run.grads[8 * step:8 * step + 8], ref) <= 1e-5
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # close() left nothing


def test_a_finished_store_is_never_written_over(tmp_path, tokenizer, dataset):
    from ghostproj.integrations.transformers import GradientStoreCallback

    first = GradientStoreCallback(tmp_path / "store", dataset, rank=RANK)
    train(tmp_path / "a", tokenizer, dataset, [first], steps=2)
    before = {p.name: p.read_bytes() for p in first.windows[0].iterdir()}
    with pytest.raises(GhostprojError, match="already holds files"):
        train(tmp_path / "b", tokenizer, dataset, [GradientStoreCallback(tmp_path / "store", dataset, rank=RANK)],
              steps=2)
    assert {p.name: p.read_bytes() for p in first.windows[0].iterdir()} == before


def test_windows_between_checkpoints_pair_with_their_checkpoints(tmp_path, tokenizer, dataset):
    """window='checkpoint': step-0, step-2, step-4 hold the rows of the steps after each
    checkpoint, each fingerprinted with the model of that checkpoint (what its queries are
    projected on); no empty window is left after the last one."""
    from transformers import DataCollatorForLanguageModeling, GPT2LMHeadModel, Trainer, TrainingArguments

    from ghostproj.integrations.transformers import GradientStoreCallback
    from ghostproj.jobs.run_records import weights_sha

    store = GradientStoreCallback(tmp_path / "store", dataset, rank=RANK, window="checkpoint")
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=2,
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0)
    base = gpt2_without_dropout(len(tokenizer))
    Trainer(model=base, args=args, train_dataset=dataset, callbacks=[store],
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["step-0", "step-2", "step-4"]
    seen = []
    for window in store.windows:
        run = open_run(window)
        seen += load_projections(window).index.tolist()
        step = int(window.name.split("-")[1])
        model = gpt2_without_dropout(len(tokenizer)) if step == 0 else \
            GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt" / f"checkpoint-{step}")
        engine = GradProjectionEngine(model, rank=RANK)
        assert run.manifest.fingerprint_parts["model_weights"] == weights_sha(model, engine, None)
    assert sorted(seen) == list(range(len(dataset)))


def test_a_row_that_is_not_in_the_dataset_is_refused(tmp_path, tokenizer, dataset):
    """A packing collator joins rows: the joined row is no dataset row, and no vector of it is
    stored under a wrong index."""
    from ghostproj.integrations.transformers import GradientStore

    model = gpt2_without_dropout(len(tokenizer)).train()
    store = GradientStore(model, tmp_path / "store", dataset, rank=RANK)
    store.open_window(0)
    packed = torch.tensor([dataset[0]["input_ids"] + dataset[1]["input_ids"]])
    with pytest.raises(GhostprojError, match="not in the train_dataset given"):
        with store.observing(0):
            model(input_ids=packed, labels=packed).loss.backward()
    store.close()
    assert load_projections(store.windows[0]).index.numel() == 0


@needs_torchrun
def test_ddp_ranks_store_their_rows_into_one_run(tmp_path):
    """A Trainer on 2 ranks: each rank stores the rows it draws, the window is one complete
    run of every row once, and its vectors are project's on the step's (initial) model."""
    from pathlib import Path

    from transformers import GPT2LMHeadModel

    proc = torchrun(2, [tmp_path], script=Path(__file__).with_name("ddp_trainer_store.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    window = tmp_path / "store" / "epoch-0"
    assert sorted(p.name for p in window.iterdir() if p.name.startswith("manifest")) == ["manifest.json"]
    assert {p.name[:10] for p in window.glob("grads-*")} == {"grads-r000", "grads-r001"}  # both ranks wrote rows
    manifest = open_run(window).manifest
    assert manifest.complete and manifest.data["count"] == 16
    run = load_projections(window)
    assert sorted(run.index.tolist()) == list(range(16))
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    ref = project_rows(model, datasets.load_from_disk(str(tmp_path / "dataset")), run.index.tolist())
    assert rel_err(run.grads, ref) <= 1e-5


@needs_torchrun
def test_a_killed_ddp_training_resumed_from_a_checkpoint_continues_every_ranks_store(tmp_path):
    """2 ranks, 4 steps, a checkpoint every 2 steps, killed after step 3: resumed from
    checkpoint-2, each rank cuts its own part back to the checkpoint and continues, and the
    joined window equals an uninterrupted 2-rank run's."""
    from pathlib import Path

    script = Path(__file__).with_name("ddp_trainer_store.py")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert torchrun(2, [clean, 2, 0], script=script).returncode == 0
    assert torchrun(2, [killed, 2, 3], script=script).returncode != 0
    window = killed / "store" / "epoch-0"
    assert not (window / "manifest.json").exists() and (window / "manifest-r001.json").exists()
    # one rank's part lost: every rank refuses in one sentence, none waits for the others
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(killed, partial)
    (partial / "store" / "epoch-0" / "manifest-r001.json").unlink()
    proc = torchrun(2, [partial, 2, 0, partial / "trainer" / "checkpoint-2"], script=script, timeout=120)
    assert proc.returncode != 0 and "holds the rows of some ranks only" in proc.stderr
    proc = torchrun(2, [killed, 2, 0, killed / "trainer" / "checkpoint-2"], script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = load_projections(window), load_projections(clean / "store" / "epoch-0")
    assert sorted(got.index.tolist()) == list(range(16)) and open_run(window).manifest.data["count"] == 16
    assert rel_err(got.grads[got.index.argsort()], want.grads[want.index.argsort()]) <= 1e-5


def test_configurations_the_store_cannot_serve_are_one_sentence(tmp_path, tokenizer, dataset):
    """Unknown layers, a wrapper that hides the logits, and label smoothing (unequal token
    weights) are refused in one sentence, before a wrong vector is written."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from ghostproj.integrations.transformers import GradientStoreCallback

    class LossOnly(torch.nn.Module):
        """A model wrapped so that only its loss comes out."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, **inputs):
            return {"loss": self.lm(**inputs).loss}

    def run(model, out, **extra):
        args = TrainingArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=1,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, **extra)
        Trainer(model=model, args=args, train_dataset=dataset,
                callbacks=[GradientStoreCallback(tmp_path / out / "store", dataset, rank=RANK,
                                                 layers=["nope"] if out == "layers" else None)],
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()

    with pytest.raises(GhostprojError, match="Layer pattern 'nope' matches no module"):
        run(gpt2_without_dropout(len(tokenizer)), "layers")
    with pytest.raises(GhostprojError, match="No gradient reached the model's logits"):
        run(LossOnly(gpt2_without_dropout(len(tokenizer))), "wrapped", remove_unused_columns=False)
    with pytest.raises(GhostprojError, match="weighs an example's tokens unequally"):
        run(gpt2_without_dropout(len(tokenizer)), "smoothed", label_smoothing_factor=0.1)
