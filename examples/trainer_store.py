"""Attribution from a training run you already have: a transformers.Trainer fine-tunes the
embedded demo model for one epoch while GradientStoreCallback stores every training
example's projected gradient; the queries are then projected with --like the stored run
on the model the epoch started from, and scored as any two runs are.

    pip install datasets && python examples/trainer_store.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from ghostproj.integrations.transformers import GradientStoreCallback
from ghostproj.jobs.demo import ensure_demo

demo = ensure_demo()
tokenizer = AutoTokenizer.from_pretrained(demo.model)
model = AutoModelForCausalLM.from_pretrained(demo.model)
texts = [json.loads(line)["text"] for line in Path(demo.train).read_text().splitlines()]
rows = dict.fromkeys(tuple(tokenizer(t)["input_ids"][:64]) for t in texts if t.strip())  # distinct, in order
train = datasets.Dataset.from_dict({"input_ids": [list(r) for r in rows]})

work = Path(tempfile.mkdtemp(prefix="ghostproj-trainer-"))
model.save_pretrained(work / "start")  # the model the epoch starts from: its queries are projected on it
tokenizer.save_pretrained(work / "start")
store = GradientStoreCallback(work / "store", train, rank=256)
args = TrainingArguments(output_dir=str(work / "trainer"), per_device_train_batch_size=16, num_train_epochs=1,
                         learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True)
Trainer(model=model, args=args, train_dataset=train, callbacks=[store],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()

window = store.windows[0]
ghostproj = [sys.executable, "-m", "ghostproj"]
subprocess.run([*ghostproj, "project", "--model", str(work / "start"), "--data", str(demo.query), "--max-length",
                "64", "--like", str(window), "--out", str(work / "query.st")], check=True)
subprocess.run([*ghostproj, "score", str(window), str(work / "query.st"), "--top-k", "5", "--show", "2"], check=True)
print(f"runs kept in {work}")
