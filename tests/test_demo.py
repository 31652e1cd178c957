from ghostproj.demo import ensure_demo, run_demo
from ghostproj.demo_corpus import MODULES, demo_splits
from helpers import run_cli


def test_corpus_is_real_text_deterministic_and_labelled():
    (train_a, query_a), (train_b, query_b) = demo_splits(), demo_splits()
    assert train_a == train_b and query_a == query_b
    assert {r["topic"] for r in train_a} == {r["topic"] for r in query_a} == set(MODULES)
    assert len(query_a) == 20 * len(MODULES) and len(train_a) > 500
    assert not {r["text"] for r in train_a} & {r["text"] for r in query_a}  # held-out queries
    lengths = sorted(len(r["text"].split()) for r in train_a)
    assert lengths[0] >= 6 and lengths[-1] <= 60 and lengths[len(lengths) // 2] < lengths[-1] // 2


def test_demo_end_to_end(capsys, ghost_home, tmp_path):
    """The first thing a new user runs: builds (or reuses) the embedded model, projects,
    scores, and reports same-topic precision above chance, with metrics that differ."""
    code, out, err = run_cli(["demo", "--out", tmp_path / "demo", "--show", "1"], capsys)
    assert code == 0, err
    assert "precision@10" in out and "--normalize layer" in out
    from ghostproj.progress import console, status

    precisions = run_demo(tmp_path / "demo", console, status, show=0)
    chance = precisions.pop(("random", "none"))
    assert chance < 0.2 and all(p > 1.5 * chance for p in precisions.values()), precisions
    assert len({round(p, 3) for p in precisions.values()}) >= 3  # the settings are told apart
    assert max(precisions.values()) < 0.9  # real text: no metric is trivially perfect
    # the default commands run on the cached demo with no arguments
    assert ensure_demo().train.exists()
    code, out, _ = run_cli(["naive-check", "--samples", "4"], capsys)
    assert code == 0 and "OK" in out
