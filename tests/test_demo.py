from ghostproj.demo import TOPICS, ensure_demo, generate_corpus
from helpers import run_cli


def test_corpus_is_deterministic_and_labelled():
    a, b = generate_corpus(per_topic=20), generate_corpus(per_topic=20)
    assert a == b and len(a) == 20 * len(TOPICS)
    assert {r["topic"] for r in a} == set(TOPICS)


def test_demo_end_to_end(capsys, ghost_home, tmp_path):
    """The first thing a new user runs: builds (or reuses) the embedded model, projects,
    scores, and reports same-topic precision well above chance."""
    code, out, err = run_cli(["demo", "--out", tmp_path / "demo", "--show", "1"], capsys)
    assert code == 0, err
    assert "precision@10" in out and "random baseline" in out
    rows = {line.split("│")[1].strip(): float(line.split("│")[2]) for line in out.splitlines()
            if line.count("│") == 3 and line.split("│")[2].strip().replace(".", "").isdigit()}
    assert rows["cosine"] > 0.8 and rows["random baseline"] < 0.2
    # the default commands run on the cached demo with no arguments
    assert ensure_demo().train.exists()
    code, out, _ = run_cli(["naive-check", "--samples", "4"], capsys)
    assert code == 0 and "OK" in out
