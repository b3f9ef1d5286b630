"""One PLANER MoE layer's time against the number of active experts, next to the dense FFN it replaces.

Input: the token states entering layer 1's FFN for batches of real validation samples in split order
(review task, MiniLM-L6 tokenizer, padded to the batch's longest sample), from a saved PLANER model
(its trained routers pick the experts) or a fresh conversion of a dense model (untrained routers:
the expert mix differs, the shapes do not). Cases, timed interleaved (round-robin, median of
repeats): the dense FFN on every position (as the dense model runs it), the dense FFN on the real
tokens only, the MoE layer (router, top-k selection, grouped experts on the real tokens) at
top-k 1, 2 (25% of 8 experts), 4 and 8 with each expert-execution path (`torch._grouped_mm`, and
the portable per-expert loop with its one host sync), and the router alone. The ratio column is
each case's time over the dense FFN's in the same run.

    .venv/bin/python benchmarks/planer_layer.py runs/planer-moe8 --out benchmarks/results/planer-layer --threads 2

Writes results.json and results.md (machine, threads, torch version, batch size, lengths stamped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from layer_timing import ffn_inputs, load_model, parser, time_cases, write_results

from adaptinf.methods.planer import PlanerClassifier, grouped_experts, grouped_mm_works, select_experts


def main() -> None:
    args = parser(__doc__.splitlines()[0], "a PLANER model directory, or a dense one (converted here, routers untrained)",
                  "results/planer-layer").parse_args()
    model = load_model(args.model, PlanerClassifier, args.threads)
    # real tokens as row indices, computed once per batch as the model does (`prepare`)
    inputs = [(x, real.nonzero().squeeze(1), ln) for x, real, ln in ffn_inputs(model, args)]
    ffn, router = model.encoder.blocks[0].ffn, model.routers[0]
    e = model.config.num_experts
    impls = ["grouped_mm", "loop"] if grouped_mm_works("cpu", torch.float32) else ["loop"]

    def dense_case(x, real):
        return ffn.down(F.gelu(ffn.up(x)))

    def dense_real_case(x, real):  # the same FFN on the real tokens only (gathered), no padding
        return torch.zeros_like(x).index_copy_(0, real, ffn.down(F.gelu(ffn.up(x.index_select(0, real)))))

    def moe_case(k, impl):
        def run(x, real):
            xr = x.index_select(0, real)
            sel = select_experts(router(xr), k, None)
            y = grouped_experts(xr, sel, ffn.up.weight, ffn.up.bias, ffn.down.weight, impl=impl) + ffn.down.bias
            return torch.zeros_like(x).index_copy_(0, real, y)
        return run

    def router_case(x, real):
        return select_experts(router(x.index_select(0, real)), 2, None)

    cases = {"dense FFN": dense_case, "dense FFN, real tokens only": dense_real_case}
    for k in (1, 2, 4, e):
        for impl in impls:
            cases[f"MoE top-{k} of {e} ({impl})"] = moe_case(k, impl)
    cases["router + top-2 selection"] = router_case
    times = time_cases(cases, inputs, args.repeats)
    write_results(args, times, inputs, "dense FFN",
                  {"experts": e, "hidden": ffn.up.in_features, "intermediate": ffn.up.out_features})


if __name__ == "__main__":
    main()
