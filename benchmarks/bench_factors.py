"""What the Kronecker eigenbasis costs: `ghostproj factors` and `project --factors`, each
against a plain Gaussian `project` of the same data, measured in one process, one after
the other (the best of --repeats runs each).

    python benchmarks/bench_factors.py [--model DIR --data FILE] [--repeats 3]

Without --model/--data it uses the embedded demo (740 texts, GPT-2 with 8 layers).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ghostproj.jobs.demo import ensure_demo
from ghostproj.jobs.factors import FactorsOptions, run_factors
from ghostproj.jobs.project import ProjectOptions, run_project


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    if args.model is None:
        demo = ensure_demo()
        args.model, args.data = str(demo.model), str(demo.train)
    work = Path(tempfile.mkdtemp(prefix="ghostproj-bench-factors-"))
    common = dict(model=args.model, data=args.data, batch_size=args.batch_size, max_length=args.max_length,
                  show_progress=False)
    factors = work / "factors.safetensors"
    counter = iter(range(10**6))

    def project(**extra):
        run_project(ProjectOptions(out=str(work / f"run{next(counter)}"), **common, **extra))

    t_factors = best_of(args.repeats, lambda: run_factors(FactorsOptions(out=str(factors), overwrite=True, **common)))
    t_gauss = best_of(args.repeats, project)
    t_eigen = best_of(args.repeats, lambda: project(factors=str(factors)))
    print(f"project (Gaussian):        {t_gauss:.2f} s")
    print(f"factors:                   {t_factors:.2f} s   factors / project = {t_factors / t_gauss:.2f}")
    print(f"project --factors:         {t_eigen:.2f} s   project --factors / project = {t_eigen / t_gauss:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
