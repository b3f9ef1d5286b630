"""Per-layer histogram of the chosen k (share of real tokens at k = 0..N) on validation, at given knobs."""
import sys, json, torch
torch.set_num_threads(1)
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import load_task, encode_split
from adaptinf.data import eval_batches
m = load_model(sys.argv[1]).eval(); knobs = [float(k) for k in sys.argv[2].split(",")]
val = encode_split(m, load_task(TaskSettings()), "validation", None, 0)
out = {}
with torch.inference_mode():
    for kn in knobs:
        counts = torch.zeros(len(m.names), m.config.learners + 1)
        frac = []
        for b in eval_batches(val, 64, 0):
            o = m(b.input_ids, b.attention_mask, knob=kn)
            real = b.attention_mask.bool()
            for i in range(len(m.names)):
                counts[i] += torch.bincount(o.extras["k"][i][real], minlength=m.config.learners + 1)
            frac.append(o.extras["executed_fraction"])
        h = (counts / counts.sum(1, keepdim=True)).round(decimals=3).tolist()
        out[str(kn)] = {"executed_fraction": round(float(torch.cat(frac).mean()), 3), "k_share": dict(zip(m.names, h))}
        print(kn, json.dumps(out[str(kn)]), flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
