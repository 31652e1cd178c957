import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import build_tokenizer, tiny_gpt2, tiny_llama, write_jsonl


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _saved(tmp_path_factory, name, build, tokenizer):
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    build(len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, "gpt2", tiny_gpt2, tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, "llama", tiny_llama, tokenizer)


@pytest.fixture(scope="session")
def texts():
    base = [
        "the cat sat on the mat and looked at the bird",
        "stocks fell sharply as the bank raised interest rates again this quarter",
        "a",
        "",
        "the orchestra played a slow symphony in a minor key while the audience listened in silence " * 3,
        "compile the code and run the tests",
        "the doctor treated the fever",
        "hello",
        "planets orbit the sun in elliptical paths",
        "bake the bread for forty minutes",
    ]
    return base


@pytest.fixture(scope="session")
def data_file(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("data")
    path = d / "train.jsonl"
    write_jsonl(path, [{"text": t, "topic": f"t{i % 3}"} for i, t in enumerate(texts)])
    return path


@pytest.fixture(scope="session")
def ghost_home(tmp_path_factory):
    """Where the embedded demo is built once for the whole session (or reused from CI's cache)."""
    home = os.environ.get("GHOSTPROJ_HOME") or str(tmp_path_factory.mktemp("home"))
    os.environ["GHOSTPROJ_HOME"] = home
    return home
