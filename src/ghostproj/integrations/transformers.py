"""A training-time gradient store for ``transformers.Trainer`` (and the trainers built on
it): :class:`GradientStoreCallback` projects each training example's gradient at the
steps it observes, in the same backward pass as training, and writes one ordinary run
per epoch (manifest, shards, projector), which ``score``, ``fisher`` and ``index`` read
unchanged.

Two things make the stored vectors equal to ``ghostproj project`` on the model of that
step:

- **Per-example identity.** The Trainer shuffles, drops columns and pads, so each row is
  found by its content: the hash of its unpadded token ids, looked up in the training
  dataset given to the callback. Two dataset rows with the same token ids are refused at
  the start, since no row could then be told from the other.
- **The loss convention.** The Trainer back-propagates a token mean over the batch (over
  all micro-batches of a step under gradient accumulation, in whatever precision scaling
  it uses). The engine's block for example i is therefore c_i times the gradient of the
  sum of its token losses. c_i is read off the gradient of the model's logits at one of
  the example's label positions, c = (dL/dz_y) / (p_y - 1), and checked at another (with
  a fused LM head such as TRL's, which returns each label's log-probability instead of the
  logits, c = -dL/d log p_y). A
  loss that weighs tokens unequally (label smoothing, token weights) is refused in one
  sentence, because its vectors cannot be rescaled exactly. Dividing by c_i (and by the
  example's label count for ``loss_reduction="mean"``) gives ``project``'s vector exactly,
  because the projection is linear.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import defaults
from ..data.batching import IGNORE_INDEX
from ..engines.coverage import engine_coverage
from ..engines.projection import GradProjectionEngine
from ..engines.projector import projector_hash
from ..errors import GhostprojError
from ..jobs.run_records import weights_sha
from ..models import config_hash
from ..store.files import atomic_write
from ..store.fingerprint import fingerprint, fingerprint_parts, sha256_hex
from ..store.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    PROJECTOR_FILE,
    Manifest,
    rank_manifest_name,
    read_manifest,
    write_manifest,
)
from ..store.projector_file import encode_projectors
from ..store.writer import RunWriter, keep_first_rows
from .identity import batch_rows, dataset_keys, fresh_dir, token_key
from .inrun import InRunValuationTrainer
from .ranks import join_rank_runs, on_rank_zero, over_ranks, process_ranks, total_over_ranks

SCALE_TOLERANCE = 1e-3  # c_i read at two label positions of one example agree to float32 rounding


class GradientStore:
    """The training-time gradient store of any training loop over a HF causal LM: each
    observed step's per-example projected gradients, written to one run per window.

        store = GradientStore(model, "store/", train_dataset)
        store.open_window(0)
        for step, batch in enumerate(loader):
            with store.observing():                 # around each step's backward passes
                model(**batch).loss.backward()      # (call store.collect() after each micro-batch's)
            optimizer.step(); optimizer.zero_grad()
            store.mark_step(step + 1)
        store.close()

    ``train_dataset``: the tokenized rows the loop trains on (each batch row is found by its
    token ids), or their number when the loop passes each batch's rows to :meth:`observing`; ``layers``, ``rank``, ``seed``, ``loss_reduction`` and ``store_dtype`` mean
    what they mean for ``project``."""

    def __init__(self, model, out_dir: str, train_dataset=None, layers: list[str] | None = None,
                 rank: int = defaults.RANK, seed: int = 0, loss_reduction: str = defaults.LOSS_REDUCTION,
                 store_dtype: str = "float32", shard_size: int = 4096, keys: dict[str, int] | None = None,
                 settings: dict | None = None) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise GhostprojError(f"Unknown loss_reduction '{loss_reduction}'; choose mean or sum.")
        self.model, self.out_dir, self.seed = model, Path(out_dir), seed
        self.loss_reduction, self.store_dtype, self.shard_size = loss_reduction, store_dtype, shard_size
        self.settings = {"window": "epoch", **(settings or {})}  # recorded in each window's manifest
        if keys is None and isinstance(train_dataset, int):  # the loop passes each batch's rows itself
            self.keys, self.dataset_rows = None, train_dataset
        else:
            self.keys = keys if keys is not None else dataset_keys(train_dataset)
            self.dataset_rows = len(self.keys)
        self.engine = GradProjectionEngine(model, layers, rank=rank, seed=seed, freeze_weights=False)
        self.windows: list[Path] = []
        # under torchrun (DDP) each rank stores its own rows, as project's ranks do, and rank 0
        # joins them into the window's run when it closes
        self.rank, self.world = process_ranks()
        self._manifest_name = MANIFEST if self.world == 1 else rank_manifest_name(self.rank)
        self._hooks = [model.register_forward_pre_hook(self._on_inputs, with_kwargs=True),
                       model.register_forward_hook(self._on_outputs)]
        self._batch: dict | None = None  # the micro-batch in flight: its rows, label counts and scales
        self._writer: RunWriter | None = None
        self._observing = False
        self._given = None  # (rows, labels) the loop gave for the next forward
        self._step = 0

    @property
    def step(self) -> int:
        """The optimizer step being observed (or the last one marked done)."""
        return self._step

    # -- steps ------------------------------------------------------------------------------------
    @contextmanager
    def observing(self, step: int | None = None, rows: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None):
        """Store the per-example gradients of the backward passes inside the block. A loop
        that knows each batch row's dataset row and labels (a loss computed outside the
        model) passes them: ``rows`` [B] and ``labels`` [B, T] of the block's one forward."""
        self.begin_step(self._step if step is None else step, rows, labels)
        try:
            yield self
            self.collect()
        finally:
            self.stop_observing()

    def begin_step(self, step: int, rows: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        self._step, self._observing = step, True
        self._given = None if rows is None else (rows.cpu(), labels)
        self.engine.attach()

    def stop_observing(self) -> None:
        if self._observing:
            self.engine.detach()
            self._observing, self._batch = False, None

    def mark_step(self, step: int) -> None:
        """Step ``step`` is done (observed or not): where its rows end, what a resume cuts back to."""
        self._step = step
        if self._writer is not None:
            self._boundaries.append([step, self._rows])

    def flush(self) -> None:
        """Every row so far to disk, with where each step's rows end (at a checkpoint)."""
        if self._writer is not None:
            self._writer.flush()
            self._manifest.steps = [list(b) for b in self._boundaries]
            write_manifest(self._writer.run_dir, self._manifest, self._manifest_name)

    def close(self) -> None:
        self.close_window()
        self.stop_observing()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- one micro-batch -------------------------------------------------------------------------
    def _on_inputs(self, module, args, kwargs):
        if not (self._observing and torch.is_grad_enabled()):
            return None
        ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if self._given is not None:  # the loop said which rows these are
            (rows, labels), self._given = self._given, None
            self._batch = {"rows": rows, "labels": labels, "counts": (labels[:, 1:] != IGNORE_INDEX).sum(1).cpu()}
            return None
        if self.keys is None:
            raise GhostprojError("This store was given the number of training rows, not the rows: pass each "
                                 "batch's rows and labels to observing().")
        if ids is None or labels is None:
            raise GhostprojError("The gradient store needs batches with input_ids and labels (a causal-LM "
                                 "collator), so that each row's loss and identity are known.")
        rows = batch_rows(self.keys, ids, kwargs.get("attention_mask"))
        self._batch = {"rows": rows, "labels": labels, "counts": (labels[:, 1:] != IGNORE_INDEX).sum(1).cpu()}
        return None

    def _on_outputs(self, module, args, output):
        batch = self._batch
        if batch is None or "scale" in batch or batch.get("watched"):
            return
        logits, log_probs = (getattr(output, name, None) for name in ("logits", "log_probs"))
        if logits is not None:
            batch["watched"], kept = True, logits.detach()
            logits.register_hook(lambda grad: batch.__setitem__("scale", self._scales(
                batch, lambda i, t, y: self._from_logits(grad, kept, i, t, y))))
        elif log_probs is not None:  # a fused LM head (TRL's): each label token's log-probability, no logits
            batch["watched"] = True
            log_probs.register_hook(lambda grad: batch.__setitem__("scale", self._scales(
                batch, lambda i, t, y: -float(grad[i, t].double()))))

    @staticmethod
    def _from_logits(grad: torch.Tensor, logits: torch.Tensor, i: int, t: int, y: int) -> float:
        # a token's loss -log softmax(z)_y has gradient (p_y - 1) along z_y
        p = torch.softmax(logits[i, t].double(), dim=-1)[y]
        return float(grad[i, t, y].double()) / (float(p) - 1.0)

    def _scales(self, batch: dict, read) -> torch.Tensor:
        """c_i per example: the loss's weight on each of its label tokens, ``read(i, t, y)`` at
        next-token position t (label y), checked at the example's first and last label."""
        labels = batch["labels"][:, 1:]
        scales = torch.zeros(labels.shape[0], dtype=torch.float64)
        for i in range(labels.shape[0]):
            where = (labels[i] != IGNORE_INDEX).nonzero().flatten()
            if where.numel() == 0:
                continue
            read_at = [read(i, t, int(labels[i, t])) for t in {int(where[0]), int(where[-1])}]
            if max(read_at) - min(read_at) > SCALE_TOLERANCE * max(abs(r) for r in read_at):
                raise GhostprojError("The training loss weighs an example's tokens unequally (label smoothing, "
                                     "token weights or a DFT loss), so its gradients cannot be rescaled to project's "
                                     "per-example loss exactly; train without them while storing gradients.")
            scales[i] = read_at[0]
        return scales

    def collect(self) -> None:
        """After a backward pass inside :meth:`observing`: its rows to the window's run."""
        batch, self._batch = self._batch, None
        if not self._observing or batch is None:
            return
        blocks = self.engine.collect().double().cpu()
        scales, counts = batch.get("scale"), batch["counts"]
        if scales is None:
            raise GhostprojError("No gradient reached the model's logits; the store keeps the "
                                 "gradients of a loss computed from them.")
        live = scales != 0
        divide = scales * (counts.double() if self.loss_reduction == "mean" else 1.0)
        vectors = torch.where(live[:, None], blocks / torch.where(live, divide, 1.0)[:, None], 0.0)
        self._writer.add(vectors.float(), batch["rows"], torch.zeros(len(counts)), counts.to(torch.int32))
        self._seen.append(batch["rows"])
        self._rows += len(counts)

    # -- one window, one run ---------------------------------------------------------------------
    def open_window(self, name: int | str, step: int = 0) -> None:
        """Start the run ``out_dir/epoch-<name>`` (or ``out_dir/<name>`` for a string), continued,
        cut back to ``step``'s rows, when a killed loop left it and resumes at ``step`` > 0."""
        out = self.out_dir / (f"epoch-{name}" if isinstance(name, int) else name)
        self.windows.append(out)
        if step > 0 and self._reopened(out, step):  # a Trainer resumed inside this epoch
            return
        on_rank_zero(self.world, lambda: fresh_dir(out))
        engine = self.engine
        # the model the window starts from (the base model, or the checkpoint the previous epoch
        # ended with) is the one its query runs are projected with (`project --like`)
        parts = fingerprint_parts(engine.layers, weights_sha(self.model, engine, None),
                                  projector_hash(engine.projectors), self.loss_reduction, False)
        projector = encode_projectors(engine.projectors, {"format": str(FORMAT_VERSION),
                                                          "fingerprint": fingerprint(parts)})
        if self.rank == 0:
            atomic_write(out / PROJECTOR_FILE, projector)
        self._manifest = Manifest(
            fingerprint=fingerprint(parts), fingerprint_parts=parts,
            model={"path": None, "class": type(self.model).__name__, "config_hash": config_hash(self.model),
                   "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")},
            data={"format": "trainer", "count": 0}, loss_reduction=self.loss_reduction, bias=False,
            projector={"kind": engine.projector_kind, "seed": self.seed, "file": PROJECTOR_FILE,
                       "sha256": sha256_hex(projector)},
            layers=list(engine.layers), store_dtype=self.store_dtype, settings=dict(self.settings),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), steps=[[step, 0]],
            coverage=engine_coverage(self.model, engine).to_json())
        write_manifest(out, self._manifest, self._manifest_name)
        self._writer = self._run_writer(out)
        self._seen, self._rows, self._boundaries = [], 0, [[step, 0]]

    def _run_writer(self, out: Path) -> RunWriter:
        return RunWriter(out, self._manifest, self.shard_size, rank=self.rank, manifest_name=self._manifest_name)

    def _reopened(self, out: Path, step: int) -> bool:
        """Whether every rank continued the window a killed run left. The ranks decide
        together: a kill can stop one rank before its rows of the checkpoint reached the
        disk, and a rank that went on alone would wait for the others forever."""
        found, refusal = (out / self._manifest_name).is_file(), None
        if found:
            try:
                self._reopen_window(out, step)
            except GhostprojError as exc:
                refusal = str(exc)
        outcomes = over_ranks((found, refusal), self.world)
        refusal = next((r for _, r in outcomes if r is not None), None)
        if refusal is None and len({f for f, _ in outcomes}) > 1:
            refusal = (f"{out} holds the rows of some ranks only (the run was killed before every rank's rows up "
                       f"to step {step} reached the disk); resume from an earlier checkpoint or store into a new "
                       "out_dir.")
        if refusal is not None:
            raise GhostprojError(refusal)
        return found

    def _reopen_window(self, out: Path, step: int) -> None:
        """Continue a window a killed run left: its rows up to the checkpoint's step are kept,
        any written after it are dropped, and the resumed steps add theirs."""
        if (out / MANIFEST).is_file() and self.world > 1:
            raise GhostprojError(f"{out} is a finished window, but the Trainer resumes inside its epoch; give the "
                                 "callback a new out_dir.")
        manifest = read_manifest(out, self._manifest_name)
        if manifest.complete:
            raise GhostprojError(f"{out} is a finished window, but the Trainer resumes inside its epoch; give the "
                                 "callback a new out_dir.")
        if (manifest.projector or {}).get("sha256") != sha256_hex(encode_projectors(
                self.engine.projectors, {"format": str(FORMAT_VERSION), "fingerprint": manifest.fingerprint})):
            raise GhostprojError(f"{out} was stored with other layers, ranks or seed than this callback's.")
        boundaries = manifest.steps or []
        rows = next((r for s, r in boundaries if s == step), None)
        if rows is None:
            raise GhostprojError(f"{out} does not hold the rows up to step {step} (the run was killed before they "
                                 "reached the disk); resume from an earlier checkpoint or store into a new out_dir.")
        seen = keep_first_rows(out, manifest, rows, self._manifest_name)
        self._manifest = manifest
        self._boundaries = [b for b in boundaries if b[0] <= step]
        self._manifest.steps = [list(b) for b in self._boundaries]
        self._writer = self._run_writer(out)
        self._seen, self._rows = [seen], rows

    def close_window(self) -> None:
        if self._writer is None:
            return
        seen = torch.cat(self._seen) if self._seen else torch.empty(0, dtype=torch.long)
        everything = len(seen) == self.dataset_rows and torch.equal(seen.sort().values, torch.arange(len(seen)))
        # a window that saw every training row once is checked as a whole run is; any other
        # (every > 1, a partial epoch) holds a subset, and says only how many rows
        self._manifest.data = {"format": "trainer", "count": self.dataset_rows if everything else None,
                                  "rows": len(seen)}
        self._manifest.steps = [list(b) for b in self._boundaries]
        self._writer.finish({"examples": len(seen), "last_step": self._step})
        out, self._writer = self._writer.run_dir, None
        if self.world > 1:
            on_rank_zero(self.world, lambda: join_rank_runs(out, self.dataset_rows))

    def drop_empty_window(self) -> None:
        """Remove a window that was opened but got no row (one opened at the last checkpoint)."""
        if self._writer is not None and total_over_ranks(self._rows, self.world) == 0:
            out = self._writer.run_dir
            self._writer.close()
            self._writer = None
            self.windows.remove(out)
            on_rank_zero(self.world, lambda: shutil.rmtree(out))




class GradientStoreCallback(TrainerCallback):
    """:class:`GradientStore` inside ``transformers.Trainer``: every ``every``-th optimizer
    step observed, one run per epoch under ``out_dir`` (``epoch-0``, ``epoch-1``, ...), all
    with the same projector, so ``project --like`` of any of them gives the matching query
    run; a Trainer resumed from a checkpoint continues the epoch's run.

    ``window="checkpoint"``: one run per stretch between the Trainer's checkpoints instead,
    ``out_dir/step-<s>`` holding the steps after checkpoint s (``step-0``: from the start). Its
    query runs are projected on ``checkpoint-<s>`` (the base model for ``step-0``), which is
    TracIn-CP's pairing.

    ``train_dataset``: the tokenized rows the Trainer batches; None takes them from the
    Trainer's own dataloader when training begins (what a trainer that tokenizes for itself,
    such as TRL's ``SFTTrainer``, batches)."""

    def __init__(self, out_dir: str, train_dataset=None, layers: list[str] | None = None, rank: int = defaults.RANK,
                 seed: int = 0, every: int = 1, loss_reduction: str = defaults.LOSS_REDUCTION,
                 store_dtype: str = "float32", shard_size: int = 4096, window: str = "epoch") -> None:
        if every < 1:
            raise GhostprojError(f"every must be at least 1, got {every}.")
        if window not in ("epoch", "checkpoint"):
            raise GhostprojError(f"Unknown window '{window}'; choose epoch or checkpoint.")
        self.window = window
        if loss_reduction not in ("mean", "sum"):
            raise GhostprojError(f"Unknown loss_reduction '{loss_reduction}'; choose mean or sum.")
        self.every = every
        self.options = dict(out_dir=out_dir, layers=layers, rank=rank, seed=seed, loss_reduction=loss_reduction,
                            store_dtype=store_dtype, shard_size=shard_size,
                            keys=None if train_dataset is None else dataset_keys(train_dataset),
                            settings={"every": every, "window": window})
        self.store: GradientStore | None = None

    @property
    def windows(self) -> list[Path]:
        return self.store.windows if self.store is not None else []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise GhostprojError("GradientStoreCallback got no model from the Trainer.")
        if getattr(args, "label_smoothing_factor", 0):  # the Trainer then keeps the labels from the model
            raise GhostprojError("Label smoothing weighs an example's tokens unequally, so its gradients cannot be "
                                 "rescaled to project's per-example loss exactly; train without it while storing "
                                 "gradients.")
        options = dict(self.options)
        if options["keys"] is None:
            dataset = getattr(train_dataloader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise GhostprojError("GradientStoreCallback needs the training rows: give it train_dataset (the "
                                     "Trainer's dataloader holds no dataset of known length).")
            options["keys"] = dataset_keys(dataset)
        self.store = GradientStore(model, **options)
        if self.window == "checkpoint":
            self.store.open_window(f"step-{state.global_step}", state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.window == "epoch":
            self.store.open_window(int(state.epoch or 0), state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.store.begin_step(state.global_step)

    def on_substep_end(self, args, state, control, **kwargs):
        self.store.collect()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.store.collect()
        self.store.stop_observing()

    def on_step_end(self, args, state, control, **kwargs):
        self.store.mark_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.window == "checkpoint":  # the stretch ends with this checkpoint; the next starts from it
            self.store.close_window()
            self.store.open_window(f"step-{state.global_step}", state.global_step)
        else:
            self.store.flush()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.window == "epoch":
            self.store.close_window()

    def on_train_end(self, args, state, control, **kwargs):
        self.store.drop_empty_window()
        self.store.close()


# one public module for the integrations
__all__ = ["GradientStore", "GradientStoreCallback", "InRunValuationTrainer", "dataset_keys", "token_key"]
