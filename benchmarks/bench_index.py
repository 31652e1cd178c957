"""Approximate index against exact scoring: recall@10, query throughput and memory.

The vectors have the structure of real projected gradients: the embedded demo model's
gradients of the demo corpus (900 real texts) are projected at --rank 144 (D = 1,152 over
8 layers), and N synthetic training rows and M query rows are drawn from a Gaussian
mixture with their mean, their covariance (eigenvectors and spectrum) and their share of
variance between topics: cluster centres carry that share, rows around them the rest,
about 1,000 rows per cluster. Queries are fresh draws from the same clusters. The runs
are ordinary bfloat16 runs with the real run's layers, so `score` and `index` read them
as they would a projected corpus.

Then, in one run: for influence, `ghostproj fisher` once (then passed to both with
--fisher, as a user with a large training set would); `ghostproj score` (exact, streaming,
with --metric as given and --normalize layer) for the M queries; `ghostproj index build` for each factory;
`ghostproj index query` at each --candidates (scan indexes) or --nprobe (FAISS IVF);
recall@10 of the index's top-10 against the exact one, the query throughput of each
(whole process, and the command's own search time) and the index's size against the raw
float32 vectors.

    python benchmarks/bench_index.py                    # N = 1,000,000, M = 1,000, the default index
    python benchmarks/bench_index.py --n-train 200000   # a quick run
    python benchmarks/bench_index.py --factories 'default;IVF1024,SQ6' --nprobes 64,256 --candidates 128,256
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ghostproj.jobs.demo import ensure_demo
from ghostproj.scoring import load_projections
from ghostproj.store import RunWriter, write_manifest
from ghostproj.store.manifest import read_manifest


def ghostproj(*args: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stderr) of one command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ghostproj", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ghostproj {' '.join(args)} failed:\n{err}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20, err


def real_vectors(root: Path) -> tuple[torch.Tensor, list[str], Path]:
    """(the demo corpus's projected gradients [900, 1152], their topics, the training run)."""
    demo = ensure_demo()
    rows, topics = [], []
    for name in ("train", "query"):
        out = root / f"real-{name}.st"
        if not out.exists():
            like = ["--like", str(root / "real-train.st")] if name == "query" else ["--rank", "144"]
            ghostproj("project", "--model", str(demo.root / "model"), "--data", str(demo.root / f"{name}.jsonl"),
                      "--out", str(out), *like)
        p = load_projections(out)
        texts = [json.loads(line) for line in (demo.root / f"{name}.jsonl").read_text().splitlines()]
        rows.append(p.grads.float())
        topics += [texts[i]["topic"] for i in p.index.tolist()]
    return torch.cat(rows), topics, root / "real-train.st"


def mixture(real: torch.Tensor, topics: list[str]):
    """(mean, covariance square root [D, D], share of variance between topics)."""
    mu = real.mean(0)
    xc = real - mu
    total = (xc ** 2).sum()
    between = sum(((xc[[i for i, t in enumerate(topics) if t == topic]].mean(0)) ** 2).sum()
                  * topics.count(topic) for topic in set(topics))
    _, s, vt = torch.linalg.svd(xc.double(), full_matrices=True)
    eig = torch.zeros(real.shape[1], dtype=torch.float64)
    eig[: s.numel()] = s ** 2 / real.shape[0]
    eig = eig.clamp(min=float(eig[s.numel() - 1]))  # the unseen tail at the smallest seen eigenvalue
    root = (vt.t() * eig.sqrt()).float()
    return mu, root, float(between / total), eig


def write_synthetic(path: Path, like: Path, rows: int, clusters: torch.Tensor, root: torch.Tensor, share: float,
                    seed: int) -> None:
    manifest = read_manifest(like).replace(shards=[], complete=False, data={"count": rows}, summary={})
    path.mkdir(parents=True)
    shutil.copy(like / "projector.safetensors", path / "projector.safetensors")
    write_manifest(path, manifest)
    writer = RunWriter(path, manifest, shard_size=65536)
    g = torch.Generator().manual_seed(seed)
    scale = (1 - share) ** 0.5
    for start in range(0, rows, 16384):
        n = min(16384, rows - start)
        which = torch.randint(0, clusters.shape[0], (n,), generator=g)
        x = clusters[which] + scale * (torch.randn(n, root.shape[0], generator=g) @ root.t())
        writer.add(x, torch.arange(start, start + n), torch.zeros(n), torch.ones(n, dtype=torch.int32))
    writer.finish({})


def topk(path: Path) -> dict[int, list[int]]:
    return {r["query"]: r["train"] for r in map(json.loads, path.read_text().splitlines())}


def generate(root: Path, args) -> None:
    train, query = root / "train.st", root / "query.st"
    t0 = time.perf_counter()
    real, topics, like = real_vectors(root)
    mu, cov_root, share, eig = mixture(real, topics)
    top = eig / eig.sum()
    print(f"real vectors: {real.shape[0]} x {real.shape[1]}; between-topic share of variance {share:.3f}; "
          f"top eigenvalues {', '.join(f'{float(v):.3f}' for v in top[:5])} of the total; "
          f"{int((top.cumsum(0) < 0.9).sum()) + 1} directions hold 90%")
    g = torch.Generator().manual_seed(0)
    n_clusters = max(1, args.n_train // args.rows_per_cluster)
    clusters = mu + share ** 0.5 * (torch.randn(n_clusters, real.shape[1], generator=g) @ cov_root.t())
    write_synthetic(train, like, args.n_train, clusters, cov_root, share, 1)
    write_synthetic(query, like, args.n_query, clusters, cov_root, share, 2)
    print(f"wrote {args.n_train} + {args.n_query} bf16 rows ({n_clusters} clusters) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1_000_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--rows-per-cluster", type=int, default=1_000)
    ap.add_argument("--factories", default="default", help="semicolon-separated --factory strings ('default': "
                                                           "what index build chooses)")
    ap.add_argument("--nprobes", default="", help="comma-separated nprobe values for FAISS IVF indexes "
                                                  "(default: the index's own)")
    ap.add_argument("--candidates", default="", help="comma-separated --candidates values for scan indexes "
                                                     "(default: the index's own)")
    ap.add_argument("--metric", default="influence", help="as score's --metric")
    ap.add_argument("--keep", help="Keep the generated runs and indexes in this directory.")
    ap.add_argument("--generate-into", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_into:
        generate(Path(args.generate_into), args)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ghostproj-bench-index-"))
    root.mkdir(parents=True, exist_ok=True)
    train, query = root / "train.st", root / "query.st"
    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}", flush=True)
    if not train.exists():
        # in a process of its own, so that this one stays small: a child starts with its parent's peak RSS
        subprocess.run([sys.executable, __file__, "--generate-into", str(root), f"--n-train={args.n_train}",
                        f"--n-query={args.n_query}", f"--rows-per-cluster={args.rows_per_cluster}"], check=True)
    n, d = read_manifest(train).data["count"], read_manifest(train).dim
    raw = n * d * 4

    exact_out = root / "exact.jsonl"
    fisher = []
    if args.metric == "influence":  # once per training set, shared by score and index, as a user would
        fisher_s, _, _ = ghostproj("fisher", str(train), "--out", str(root / "fisher.safetensors"), "--overwrite")
        fisher = ["--fisher", str(root / "fisher.safetensors")]
        print(f"ghostproj fisher: {fisher_s:.1f} s whole process (once; not counted below)")
    exact_wall, rss, err = ghostproj("score", str(train), str(query), "--top-k", "10", "--show", "0",
                                     "--metric", args.metric, "--topk-out", str(exact_out), "--overwrite", *fisher)
    own = float(re.search(r"in ([\d.]+) s", err).group(1))
    print(f"exact score: {exact_wall:.1f} s whole process ({own:.1f} s scoring), {args.n_query / exact_wall:.1f} "
          f"queries/s, peak RSS {rss:.2f} GiB")
    exact = topk(exact_out)

    print("| index | nprobe / candidates | build s | index / raw float32 | query RSS GiB | recall@10 | queries/s | "
          "÷ exact (whole process) | ÷ exact (search only) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for factory in args.factories.split(";"):
        idx = root / f"index-{re.sub(r'[^A-Za-z0-9]+', '_', factory)}"
        build_s, build_rss, err = ghostproj("index", "build", str(train), "--out", str(idx), "--overwrite",
                                            "--metric", args.metric, *fisher,
                                            *([] if factory == "default" else ["--factory", factory]))
        built = json.loads((idx / "index.json").read_text())
        size = sum(f.stat().st_size for f in idx.glob("index.*") if f.name != "index.json")
        scan = built["factory"].startswith("Scan")
        option, own_value = ("--candidates", built["candidates"]) if scan else ("--nprobe", built["nprobe"])
        values = args.candidates if scan else args.nprobes
        for value in [p for p in values.split(",") if p] or [str(own_value)]:
            out = root / "approx.jsonl"
            wall, qrss, err = ghostproj("index", "query", str(idx), str(query), "--top-k", "10", "--show", "0",
                                        "--topk-out", str(out), "--overwrite",
                                        *([option, value] if value.isdigit() and int(value) > 0 else []))
            search_s = float(re.search(r"in ([\d.]+) s", err).group(1))
            got = topk(out)
            recall = sum(len(set(got[q]) & set(exact[q])) / 10 for q in exact) / len(exact)
            print(f"| {built['factory']} | {value} | {build_s:.0f} | {size / raw:.3f} | {qrss:.2f} | {recall:.3f} | "
                  f"{args.n_query / wall:.0f} | {exact_wall / wall:.1f} | {own / max(search_s, 1e-9):.0f} |")
    print(f"(raw float32 vectors: {raw / 2**30:.2f} GiB; runs in {root})")


if __name__ == "__main__":
    main()
