"""Every method's accuracy at fixed compute budgets, from a run's points (ACM's "ahead at low budgets").

For each FLOPs reduction R asked for (`--reductions 1.5 2 3 4`: the budget is 1/R of dense's FLOPs),
each method's best validation accuracy among its knob values at >= R fewer FLOPs (on validation), and
the test accuracy and reduction of the same knob value. A method with no point that cheap gets none.
Which method leads at each budget is printed, with the gap to the next (one standard error of an
accuracy p on n samples is sqrt(p(1-p)/n): the columns carry n).

    .venv/bin/python benchmarks/budget_table.py /work/runs/vision-full/points \\
        --out benchmarks/results/vision-full/budget-table.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaptinf.evaluate import add_reductions, read_points


def table(points, reductions: list[float]) -> dict:
    """Per budget: each model's best validation point at >= R fewer FLOPs, the same knob on test, the leader."""
    val = {(p.model, p.knob): p for p in points if p.split == "validation"}
    test = {(p.model, p.knob): p for p in points if p.split == "test"}
    models = list(dict.fromkeys(p.model for p in points if p.method != "dense"))
    dense = {p.split: p for p in points if p.method == "dense"}
    rows = []
    for r in reductions:
        row = {"reduction_at_least": r, "methods": {}}
        for m in models:
            ok = [p for (mm, _), p in val.items() if mm == m and (p.flops_reduction or 0) >= r]
            best = max(ok, key=lambda p: (p.accuracy, p.flops_reduction), default=None)
            t = test.get((m, best.knob)) if best else None
            row["methods"][m] = best and {
                "knob": best.knob, "val_accuracy": best.accuracy, "val_reduction": best.flops_reduction,
                "test_accuracy": t.accuracy if t else None, "test_reduction": t.flops_reduction if t else None}
        ranked = sorted(((v["val_accuracy"], m) for m, v in row["methods"].items() if v), reverse=True)
        row["leader"] = ranked[0][1] if ranked else None
        row["lead_points"] = 100 * (ranked[0][0] - ranked[1][0]) if len(ranked) > 1 else None
        rows.append(row)
    return {"dense": {s: {"accuracy": p.accuracy, "n": p.n} for s, p in dense.items()}, "rows": rows}


def _point_files(args: list[str]) -> list[Path]:
    """A run's points/ folder stands for its per-model folders; anything else is passed on as it is."""
    found = []
    for raw in map(Path, args):
        subs = sorted(x for x in raw.iterdir() if (x / "points.json").is_file()) if raw.is_dir() else []
        found += [raw] if not subs or (raw / "points.json").is_file() else subs
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("points", nargs="+", help="a run's points/ folder, or points.json files / folders")
    p.add_argument("--reductions", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args()
    report = table(add_reductions(read_points(_point_files(args.points))), args.reductions)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    d = report["dense"]
    print("dense: " + ", ".join(f"{s} {100 * v['accuracy']:.2f} (n {v['n']})" for s, v in d.items()))
    for row in report["rows"]:
        cells = [f"{m} {100 * v['val_accuracy']:.2f}/{100 * v['test_accuracy']:.2f} ({v['val_reduction']:.2f}x)" if v else f"{m} -"
                 for m, v in row["methods"].items()]
        lead = f"{row['leader']} by {row['lead_points']:.2f}" if row["lead_points"] is not None else str(row["leader"])
        print(f">= {row['reduction_at_least']}x: " + "; ".join(cells) + f"  -> {lead}")


if __name__ == "__main__":
    main()
