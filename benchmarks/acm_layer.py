"""One ACM layer's time against the number of executed learners, next to the dense FFN it replaces.

Input: the token states entering layer 1's FFN for batches of real validation samples in split order (review
task, MiniLM-L6 tokenizer, padded to the batch's longest sample), taken from a saved ACM model (or a
fresh conversion of a dense model: timing depends on shapes, not on trained weights). Every real
token runs k learners through the token-grouped path (`Learners.grouped`); padding runs nothing.
Cases, timed interleaved (round-robin, median of repeats): the dense FFN (up, GELU, down on every
position, as the dense model runs it), the dense FFN on the real tokens only (gathered and scattered
back: what skipping padding alone saves), the ACM learners at k = 0..N for every token, and the gate
alone. The ratio column is each case's time over the dense FFN's in the same run.

    .venv/bin/python benchmarks/acm_layer.py runs/acm-b0.4 --out benchmarks/results/acm-layer

Writes results.json and results.md (machine, threads, torch version, batch size, lengths stamped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from layer_timing import ffn_inputs, load_model, parser, time_cases, write_results

from adaptinf.methods.acm import AcmClassifier


def main() -> None:
    args = parser(__doc__.splitlines()[0], "an ACM model directory, or a dense one (converted here)",
                  "results/acm-layer").parse_args()
    model = load_model(args.model, AcmClassifier, args.threads)
    if "ffn" not in model.config.targets:
        raise SystemExit("this benchmark times an FFN ACM; the model has no FFN ACMs")
    inputs = ffn_inputs(model, args)
    mod = model.module("0.ffn")
    cfg = model.spec.encoder  # the dense FFN's shape (an ACM model keeps no dense FFN; timing needs no trained weights)
    up, down = torch.nn.Linear(cfg.hidden_size, cfg.intermediate_size), torch.nn.Linear(cfg.intermediate_size, cfg.hidden_size)
    n = mod.n

    def dense_case(x, real):
        return down(F.gelu(up(x)))

    def dense_real_case(x, real):  # the same FFN on the real tokens only (gathered), no padding
        rows = real.nonzero().squeeze(1)
        return torch.zeros_like(x).index_copy_(0, rows, down(F.gelu(up(x.index_select(0, rows)))))

    def acm_case(kk):
        def run(x, real):
            k = real.to(torch.int64) * kk  # padding: 0 learners
            return mod.learners.grouped(x, k)
        return run

    def gate_case(x, real):
        return mod.pick(mod.gate(x[real]), None)

    cases = {"dense FFN": dense_case, "dense FFN, real tokens only": dense_real_case,
             **{f"ACM k={kk}": acm_case(kk) for kk in range(n + 1)}, "gate": gate_case}
    times = time_cases(cases, inputs, args.repeats)
    write_results(args, times, inputs, "dense FFN",
                  {"learners": n, "hidden": up.in_features, "intermediate": up.out_features})


if __name__ == "__main__":
    main()
