import json

import numpy as np
import pytest
import torch
from helpers import kron_reference, rel_err, run_cli, tiny_gpt2, write_jsonl

from ghostproj import GradProjectionEngine
from ghostproj.data import Example, token_budget_batches
from ghostproj.data.readers import DataSpec, load_examples
from ghostproj.jobs.checks import engine_projected_grads
from ghostproj.scoring import load_projections


def test_prompt_completion_masks_prompt_tokens(tmp_path, tokenizer):
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "Question: what does the cat do? Answer:", "completion": " the cat sat on the mat"},
            {"prompt": "bake", "completion": " the bread"}]
    write_jsonl(path, rows)
    data = load_examples(DataSpec(str(path), prompt_field="prompt", completion_field="completion"), tokenizer, 64)
    for ex, row in zip(data.examples, rows):
        enc = tokenizer(row["prompt"] + row["completion"], return_offsets_mapping=True)
        # the tokens that carry loss decode to exactly the completion
        carried = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
        assert tokenizer.decode(carried) == row["completion"]
        assert ex.input_ids == enc["input_ids"]


def test_prompt_completion_vectors_match_reference(capsys, tmp_path, gpt2_dir, tokenizer):
    from ghostproj.models import load_model

    path = tmp_path / "pc.jsonl"
    write_jsonl(path, [{"prompt": "the doctor", "completion": " treated the fever"},
                       {"prompt": "the bank", "completion": " raised rates"},
                       {"prompt": "the cat sat on the mat and the orchestra played", "completion": " a symphony"}])
    out = tmp_path / "pc.st"
    code, stdout, err = run_cli(["project", "--model", gpt2_dir, "--data", path, "--out", out, "--prompt-field",
                                 "prompt", "--completion-field", "completion", "--store-dtype", "float32",
                                 "--rank", "16", "--max-length", "12"], capsys)
    assert code == 0, err
    model, tok = load_model(str(gpt2_dir), device="cpu")
    too_long = sum(len(tok(r)["input_ids"]) >= 12 for r in ["the doctor", "the bank",
                                                          "the cat sat on the mat and the orchestra played"])
    assert too_long == 1
    assert "1 of them skipped because the prompt fills --max-length" in stdout
    examples = load_examples(DataSpec(str(path), prompt_field="prompt", completion_field="completion"), tok, 12).examples
    engine = GradProjectionEngine(model, None, rank=16)
    ref = kron_reference(model, examples, engine)
    got = load_projections(out).grads
    assert rel_err(got, ref) <= 1e-4 and torch.all(got[2] == 0)
    # the unmasked projection differs: the mask really is applied
    plain = kron_reference(model, [Example(e.index, e.input_ids) for e in examples], engine)
    assert rel_err(plain[:2], ref[:2]) > 1e-2


def test_layouts_are_read_from_the_first_row(capsys, tmp_path, gpt2_dir):
    path = tmp_path / "pc.jsonl"
    write_jsonl(path, [{"prompt": "the doctor", "completion": " treated the fever"},
                       {"prompt": "the bank", "completion": " raised rates"},
                       {"prompt": "the cat", "completion": " sat on the mat"}])
    common = ["--model", gpt2_dir, "--data", path, "--max-length", "24"]
    auto, flags = tmp_path / "auto.st", tmp_path / "flags.st"
    code, _, err = run_cli(["project", *common, "--out", auto, "--rank", "16"], capsys)
    assert code == 0 and "data layout: 'prompt' + 'completion'" in err, err
    assert run_cli(["project", *common, "--out", flags, "--rank", "16", "--prompt-field", "prompt",
                    "--completion-field", "completion"], capsys)[0] == 0
    for shard in auto.glob("grads-*"):
        assert shard.read_bytes() == (flags / shard.name).read_bytes()
    # every data-reading command takes the layout
    for cmd in (["naive-check", "--samples", "2", "--rank", "16"], ["non-interf", "--steps", "1", "--batch-size", "2"],
                ["fidelity", "--samples", "3", "--ranks", "16", "--no-dense"]):
        code, out, err = run_cli([*cmd, *common], capsys)
        assert code == 0, (cmd, err)
    code, _, err = run_cli(["inrun", "--model", gpt2_dir, "--train", path, "--val", path, "--steps", "1",
                            "--batch-size", "2", "--out", tmp_path / "inrun", "--max-length", "24"], capsys)
    assert code == 0 and "data layout: 'prompt' + 'completion'" in err, err
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", chat, "--out", tmp_path / "c"], capsys)
    assert code == 2 and "no chat template" in err  # chosen from the first row, refused for this tokenizer
    odd = tmp_path / "odd.jsonl"
    write_jsonl(odd, [{"body": "the cat", "label": 1}])
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", odd, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "its fields are 'body', 'label'" in err and "--text-field" in err


def test_chat_masks_all_but_assistant_turns(tmp_path, tokenizer):
    tok = tokenizer
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "what does the cat do"}, {"role": "assistant", "content": "it sat on the mat"},
            {"role": "user", "content": "and then"}, {"role": "assistant", "content": "it ate bread"}]
    write_jsonl(path, [{"messages": msgs}])
    ex = load_examples(DataSpec(str(path), messages_field="messages"), tok, 256).examples[0]
    carried = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert "it sat on the mat" in carried and "it ate bread" in carried
    assert "cat do" not in carried and "and then" not in carried and "user" not in carried
    tok.chat_template = None


def test_bin_blocks_and_errors(capsys, tmp_path, gpt2_dir, tokenizer):
    """A reader is checked on what it produces (token ids, rows); exactness of the vectors
    is the engine tests' business."""
    ids = []
    for t in ["the cat sat on the mat", "bake the bread for forty minutes", "planets orbit the sun"]:
        ids += tokenizer(t)["input_ids"]
    path = tmp_path / "tokens.bin"
    np.array(ids, dtype=np.uint16).tofile(path)
    data = load_examples(DataSpec(str(path)), tokenizer, 8, len(tokenizer))
    n_blocks = -(-len(ids) // 8)
    assert [e.index for e in data.examples] == list(range(n_blocks))
    assert [e.input_ids for e in data.examples] == [ids[k * 8:(k + 1) * 8] for k in range(n_blocks)]
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", odd, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not a multiple of 2" in err
    big = tmp_path / "big.bin"
    np.array([1, 2, 60000], dtype=np.uint16).tofile(big)
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", big, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "outside the model's vocabulary" in err


def test_token_budget_batches_keep_rows_and_vectors(capsys, tmp_path, gpt2_dir, data_file):
    examples = [Example(i, list(range(n))) for i, n in enumerate([5, 40, 3, 17, 40, 9, 1])]
    batches = list(token_budget_batches(examples, 64))
    assert sorted(e.index for b in batches for e in b) == list(range(7))
    assert all(len(b) * max(len(e.input_ids) for e in b) <= 64 or len(b) == 1 for b in batches)
    a, b = tmp_path / "fixed", tmp_path / "budget"
    common = ["--model", gpt2_dir, "--data", data_file, "--rank", "16", "--store-dtype", "float32", "--max-length", "24"]
    assert run_cli(["project", *common, "--out", a], capsys)[0] == 0
    assert run_cli(["project", *common, "--out", b, "--token-budget", "48", "--shard-size", "3"], capsys)[0] == 0
    pa, pb = load_projections(a), load_projections(b)
    order = torch.argsort(pb.index)
    assert pb.index[order].tolist() == pa.index.tolist()
    assert rel_err(pb.grads[order], pa.grads) <= 1e-5


def test_embedding_projection_matches_reference(tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer))
    texts = ["the cat sat on the mat", "bake the bread", "planets orbit the sun and the moon"]
    examples = [Example(i, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]
    engine = GradProjectionEngine(model, None, rank=32, include_embeddings=True)
    names = [i.name for i in engine.layers]
    assert "transformer.wte" in names and "transformer.wpe" in names and "lm_head" not in names
    wte = next(i for i in engine.layers if i.name == "transformer.wte")
    assert (wte.n_in, wte.n_out) == (len(tokenizer), 64)
    got = engine_projected_grads(model, examples, engine)
    ref = kron_reference(model, examples, engine)
    assert rel_err(got, ref) <= 1e-4  # wte's block includes the tied lm_head use
    # the other way round: the output head, tied to wte, as a Linear layer
    engine = GradProjectionEngine(model, ["lm_head"], rank=32)
    assert rel_err(engine_projected_grads(model, examples, engine), kron_reference(model, examples, engine)) <= 1e-4


def test_parquet_and_saved_hf_dataset(capsys, tmp_path, gpt2_dir, texts, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": t, "topic": str(i % 2)} for i, t in enumerate(texts)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    want = [tokenizer(t)["input_ids"][:24] for t in texts]
    for spec in (DataSpec(str(tmp_path / "train.parquet")), DataSpec(str(tmp_path / "saved"), format="hf")):
        data = load_examples(spec, tokenizer, 24)
        assert [e.index for e in data.examples] == list(range(len(texts)))
        assert [e.input_ids for e in data.examples] == want
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--rank", "16", "--max-length", "24", "--hf-dataset",
                            tmp_path / "saved", "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert load_projections(tmp_path / "hf").index.tolist() == list(range(len(texts)))


def test_missing_data_extra_is_one_sentence(capsys, tmp_path, gpt2_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", path, "--out", tmp_path / "p"], capsys)
    assert code == 2 and "pip install 'ghostproj[data]'" in err


def test_lora_adapter_projection(capsys, tmp_path, gpt2_dir, data_file):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # PEFT starts B at zero; a trained adapter does not
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    code, out, err = run_cli(["naive-check", "--model", gpt2_dir, "--data", data_file, "--adapter", adapter,
                              "--max-length", "24", "--rank", "16"], capsys)
    assert code == 0, out + err
    assert "lora" in out and "OK" in out
    run = tmp_path / "lora.st"
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--adapter", adapter, "--out", run,
                            "--max-length", "24", "--rank", "16"], capsys)
    assert code == 0, err
    layers = json.loads((run / "manifest.json").read_text())["layers"]
    assert len(layers) == 8 and all(".lora_" in l["name"] for l in layers)
    # an adapter for another architecture is refused in one sentence
    other = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir),
                                peft.LoraConfig(r=4, target_modules=["c_proj"]))
    bad = tmp_path / "bad"
    other.save_pretrained(bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--adapter", bad, "--out",
                            tmp_path / "x"], capsys)
    assert code == 2 and "does not match the model" in err and "Traceback" not in err
    # the same adapter on another base is another run: the fingerprint covers the base too
    other_base = tmp_path / "other-base"
    shifted = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():
        shifted.transformer.h[1].mlp.c_proj.weight.add_(0.01)  # a layer the adapter does not touch
    shifted.save_pretrained(other_base)
    for f in gpt2_dir.iterdir():
        if "token" in f.name or f.name.endswith(".txt") or f.name == "vocab.json":
            (other_base / f.name).write_bytes(f.read_bytes())
    run2 = tmp_path / "lora2.st"
    code, _, err = run_cli(["project", "--model", other_base, "--data", data_file, "--adapter", adapter, "--out",
                            run2, "--max-length", "24", "--rank", "16"], capsys)
    assert code == 0, err
    fp = [json.loads((r / "manifest.json").read_text())["fingerprint_parts"]["model_weights"] for r in (run, run2)]
    assert fp[0] != fp[1]


def test_plain_text_and_slow_tokenizer_fallback(capsys, tmp_path, gpt2_dir, tokenizer):
    txt = tmp_path / "lines.txt"
    txt.write_text("the cat sat on the mat\n\nbake the bread\nplanets orbit the sun\n")
    data = load_examples(DataSpec(str(txt)), tokenizer, 64)
    lines = ["the cat sat on the mat", "bake the bread", "planets orbit the sun"]
    assert [e.index for e in data.examples] == [0, 1, 2]
    assert [e.input_ids for e in data.examples] == [tokenizer(t)["input_ids"] for t in lines]

    class NoOffsets:  # a tokenizer without character offsets
        is_fast = False

        def __call__(self, text, add_special_tokens=True, **kw):
            return {"input_ids": tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]}
    path = tmp_path / "pc.jsonl"
    write_jsonl(path, [{"prompt": "the doctor", "completion": " treated the fever"}])
    data = load_examples(DataSpec(str(path), prompt_field="prompt", completion_field="completion"), NoOffsets(), 64)
    assert any("tokenized separately" in n for n in data.notes)
    ex = data.examples[0]
    n_prompt = len(tokenizer("the doctor")["input_ids"])
    assert ex.loss_mask == [False] * n_prompt + [True] * (len(ex.input_ids) - n_prompt)
