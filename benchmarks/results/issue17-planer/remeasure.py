import json, sys, torch
torch.set_num_threads(1)
from adaptinf.registry import load_model
from adaptinf.recipes import latency_table as latency
m = load_model(sys.argv[1])
t = latency.LatencyTable.load(sys.argv[1] + "/train/latency_table.json")
arch, L = m.architecture, m.spec.encoder.num_hidden_layers
for r in range(2):
    out = latency.validate(m, t, [arch, ["full/dense"] * L], repeats=int(sys.argv[2]))
    a, d = out["rows"][0]["measured_ms"], out["rows"][1]["measured_ms"]
    print(json.dumps({"round": r, "arch": arch, "measured_ms": a, "dense_ms": d, "ratio": a / d,
                      "estimated_ratio": t.estimate(arch) / t.dense_ms(L)}))
