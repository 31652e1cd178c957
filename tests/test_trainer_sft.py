"""The gradient store inside TRL's SFTTrainer with assistant-only loss on a `messages`
dataset: the vectors stored at a step equal `ghostproj project` of the same conversations
(same chat template, so the same tokens and the same assistant masks) on that step's model,
with TRL's own defaults where they keep float32 (its fused LM head, which never builds the
logits, and its gradient checkpointing)."""

import copy

import pytest
import torch
from helpers import rel_err, run_cli, word_rows, write_jsonl

from ghostproj.errors import GhostprojError
from ghostproj.scoring import load_projections

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# the assistant's content and its newline are what the model is trained on
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}\n"
            "{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat(tmp_path_factory, tokenizer):
    """A model directory whose tokenizer has the chat template, and 8 two-turn conversations."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = copy.deepcopy(tokenizer)
    tok.chat_template, tok.pad_token = TEMPLATE, tok.convert_ids_to_tokens(0)
    rows = word_rows(16, 5, 2, 6)
    conversations = [{"messages": [{"role": "user", "content": rows[i]["text"]},
                                   {"role": "assistant", "content": rows[i + 1]["text"]}]} for i in range(0, 16, 2)]
    d = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    write_jsonl(d / "chat.jsonl", conversations)
    return d


def sft(chat, out, callbacks, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = trl.SFTConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=4, num_train_epochs=1,
                         learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                         seed=0, dataloader_num_workers=0, assistant_only_loss=True, max_length=64,
                         **{"bf16": False, **config})
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(chat / "model"), args=args,
                             train_dataset=datasets.load_dataset("json", data_files=str(chat / "chat.jsonl"))["train"],
                             processing_class=AutoTokenizer.from_pretrained(chat / "model"), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sft_store_equals_project_of_the_conversations(tmp_path, chat, capsys, checkpointing):
    from ghostproj.integrations.transformers import GradientStoreCallback

    store = GradientStoreCallback(tmp_path / "store", rank=16)  # the rows come from SFTTrainer's own dataloader
    # one optimizer step of two micro-batches: every conversation is stored on the initial model
    sft(chat, tmp_path, [store], gradient_accumulation_steps=2, gradient_checkpointing=checkpointing)
    code, _, err = run_cli(["project", "--model", chat / "model", "--data", chat / "chat.jsonl", "--out",
                            tmp_path / "ref", "--rank", "16", "--messages-field", "messages", "--max-length", "64",
                            "--store-dtype", "float32"], capsys)
    assert code == 0, err
    got, want = load_projections(store.windows[0]), load_projections(tmp_path / "ref")
    assert sorted(got.index.tolist()) == want.index.tolist() == list(range(8))
    assert torch.equal(got.tokens[got.index.argsort()], want.tokens)  # the same assistant tokens carry the loss
    assert rel_err(got.grads[got.index.argsort()].float(), want.grads.float()) <= 1e-5


def test_a_loss_that_weighs_tokens_unequally_is_refused(tmp_path, chat):
    from ghostproj.integrations.transformers import GradientStoreCallback

    with pytest.raises(GhostprojError, match="weighs an example's tokens unequally"):
        sft(chat, tmp_path, [GradientStoreCallback(tmp_path / "store", rank=16)], loss_type="dft")
