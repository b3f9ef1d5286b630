"""The dense language model trained as long as the methods are (issue 19): is a method's gain over dense
its own, or the extra training every method gets?

`adaptinf run --task austen` trains dense for its budget, then converts each method from the dense
best and trains it further (`lm-full`: 2 more epochs at lr 1e-3, cosine). A method that ends *below*
dense's perplexity may only show that dense had not stopped improving. This script gives the same
extra training to the dense model itself (`adaptinf.recipes.lm.train_lm` with the run's method
settings, from the run's dense best) and scores it on validation and test, so each method is also
compared with a dense model of the same total training.

    .venv/bin/python benchmarks/lm_dense_continued.py /work/runs/lm-full --threads 1 \\
        --out benchmarks/results/issue19-lm-full/dense-continued.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from adaptinf.corpus import LMData, lm_corpus
from adaptinf.lm import evaluate_perplexity, load_lm
from adaptinf.recipes.lm import LMTrainConfig, train_lm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="an `adaptinf run --task austen` folder (its data/, dense/best and resolved.yaml)")
    p.add_argument("--work", default=None, help="training folder (default RUN/dense-continued)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())
    cfg = LMTrainConfig(**{k: v for k, v in resolved["train"].items() if k in LMTrainConfig.__dataclass_fields__})
    dense = load_lm(run / "dense" / "best")
    data = LMData.from_corpus(lm_corpus(resolved["data"]["name"]), dense.tokenizer)  # the run's tokenizer
    before = {s: evaluate_perplexity(dense, getattr(data, s), cfg.eval_batch_size) for s in ("validation", "test")}
    t0 = time.time()
    work = Path(args.work or run / "dense-continued")
    result = train_lm(dense, data, cfg, work, progress=False)
    best = load_lm(work / "best")
    after = {s: evaluate_perplexity(best, getattr(data, s), cfg.eval_batch_size) for s in ("validation", "test")}
    report = {"run": str(run), "train": cfg.to_dict(), "steps": result.steps, "seconds": round(time.time() - t0, 1),
              "dense": {s: before[s].perplexity for s in before},
              "dense_continued": {s: after[s].perplexity for s in after}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
