"""Label histograms per layer from distilled learners (phase-1 output dir), on 256 validation texts:
absolute rule (eps x |o|), relative rule (tau 1.2), and a residual-stream rule (eps x |x + o|)."""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
torch.set_num_threads(1)
from adaptinf.settings import TaskSettings
from adaptinf.steps import load_task, encode_split
from adaptinf.registry import load_model
from adaptinf.methods.acm import AcmClassifier, AcmConfig, dense_counterpart
from adaptinf.recipes import acm as R
from adaptinf.recipes.finetune import capture_tokens
from adaptinf.data import train_batches
dense = load_model(sys.argv[1]); distill = Path(sys.argv[2]); out = Path(sys.argv[3])
task = load_task(TaskSettings())
val = encode_split(dense, task, "validation", 256, 0)
model = AcmClassifier.from_dense(dense, AcmConfig())
for n in model.names:
    model.module(n).learners.load_state_dict(load_file(str(distill / f"{n}.safetensors")))
teacher = model.teacher
points = {}
for n in model.names:
    f, l = dense_counterpart(teacher, n)
    points[f"{n}:in"], points[f"{n}:out"] = (f, "input"), (l, "output")
E = {n: [] for n in model.names}; O = {n: [] for n in model.names}; S = {n: [] for n in model.names}
with torch.no_grad(), capture_tokens(points) as cap:
    for batch, _, _ in train_batches(val, 64, 0, 0, pad_id=0):
        cap.select(batch.attention_mask)
        R._teacher_pass(teacher, batch, 6)
        for n in model.names:
            x, y = cap[f"{n}:in"], cap[f"{n}:out"]
            E[n].append((model.module(n).learners.cumulative(x) - y[:, None]).norm(dim=-1))
            O[n].append(y.norm(dim=-1)); S[n].append((x + y).norm(dim=-1))
hist = lambda lab: [round(v, 3) for v in torch.bincount(lab, minlength=5).div(len(lab)).tolist()]
res = {}
for n in model.names:
    e, o, s = torch.cat(E[n]), torch.cat(O[n]), torch.cat(S[n])
    r = {"median_rel_err_k": [round(v, 3) for v in (e / o[:, None]).median(0).values.tolist()],
         "median_err_over_stream_k": [round(v, 3) for v in (e / s[:, None]).median(0).values.tolist()],
         "relative_tau1.2": hist(R.sufficient_k(e, 1.2))}
    for eps in (0.1, 0.2, 0.3, 0.4, 0.5):
        r[f"absolute_eps{eps}"] = hist(R.sufficient_k_absolute(e, o, eps))
    for eps in (0.05, 0.1, 0.15, 0.2):
        r[f"stream_eps{eps}"] = hist(R.sufficient_k_absolute(e, s, eps))
    res[n] = r
    print(n, json.dumps(r), flush=True)
out.write_text(json.dumps(res, indent=1))
