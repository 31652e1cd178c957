import pytest
from helpers import run_cli

from ghostproj.data.demo_corpus import MODULES, demo_splits
from ghostproj.jobs.demo import ensure_demo


def test_corpus_is_real_text_deterministic_and_labelled():
    (train_a, query_a), (train_b, query_b) = demo_splits(), demo_splits()
    assert train_a == train_b and query_a == query_b
    assert {r["topic"] for r in train_a} == {r["topic"] for r in query_a} == set(MODULES)
    assert len(query_a) == 20 * len(MODULES) and len(train_a) > 500
    assert not {r["text"] for r in train_a} & {r["text"] for r in query_a}  # held-out queries
    lengths = sorted(len(r["text"].split()) for r in train_a)
    assert lengths[0] >= 6 and lengths[-1] <= 60 and lengths[len(lengths) // 2] < lengths[-1] // 2


@pytest.mark.slow
def test_demo_end_to_end(capsys, ghost_home, tmp_path):
    """The first thing a new user runs: builds (or reuses) the embedded model, projects,
    scores, and reports same-topic precision above chance, with settings that differ.
    (`naive-check` on the demo is run by CI.)"""
    code, out, err = run_cli(["demo", "--out", tmp_path / "demo", "--show", "1"], capsys)
    assert code == 0, err
    assert "precision@10" in out and "--normalize layer" in out
    chance = float(out.split("(random: ")[1].split(")")[0])
    rows = [line.split("│")[1:4] for line in out.splitlines() if line.count("│") == 4]
    precisions = {(cells[0].strip(), norm): float(cells[k].strip())
                  for cells in rows if cells[0].strip() in ("cosine", "dot", "influence")
                  for k, norm in ((1, "none"), (2, "layer"))}
    assert len(precisions) == 6, out
    assert chance < 0.2 and all(p > 1.5 * chance for p in precisions.values()), precisions
    assert len(set(precisions.values())) >= 3  # the settings are told apart
    assert max(precisions.values()) < 0.9  # real text: no setting is trivially perfect
    assert ensure_demo().train.exists()
