"""Interleaved timing on real test texts (length-sorted batches as bench does): dense eager, ACM with the
committed (HEAD) inference code, ACM with the new code, same weights, at given knobs. 1 thread."""
import importlib.util, sys, time, statistics, json, torch
torch.set_num_threads(1)
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import load_task, encode_split
from adaptinf.data import eval_batches
spec = importlib.util.spec_from_file_location("acm_old", "/work/runs/acm/scripts/acm_old.py")
old = importlib.util.module_from_spec(spec); sys.modules["acm_old"] = old; spec.loader.exec_module(old)
dense = load_model(sys.argv[1]).eval(); new = load_model(sys.argv[2]).eval()
knobs = [float(k) for k in sys.argv[3].split(",")]
oc = {k: v for k, v in new.config.to_dict().items() if k in old.AcmConfig.__dataclass_fields__}
om = old.AcmClassifier(new.spec, old.AcmConfig(**oc)); om.load_state_dict(new.state_dict()); om.eval()
task = load_task(TaskSettings()); test = encode_split(dense, task, "test", 64, 0)
res = {}
for bs in (1, 32):
    batches = list(eval_batches(test, bs, 0))
    cases = {"dense": lambda b: dense(b.input_ids, b.attention_mask)}
    for k in knobs:
        cases[f"acm-old@{k}"] = (lambda b, k=k: om(b.input_ids, b.attention_mask, knob=k))
        cases[f"acm-new@{k}"] = (lambda b, k=k: new(b.input_ids, b.attention_mask, knob=k))
    times = {c: [] for c in cases}
    with torch.inference_mode():
        for b in batches[:2]:
            for f in cases.values(): f(b)
        for rep in range(5):
            for c, f in cases.items():
                t0 = time.perf_counter()
                for b in batches: f(b)
                times[c].append(time.perf_counter() - t0)
        for k in knobs:  # same outputs
            for b in batches[:2]:
                a, n = om(b.input_ids, b.attention_mask, knob=k), new(b.input_ids, b.attention_mask, knob=k)
                assert torch.allclose(a.logits, n.logits, atol=1e-4) and torch.equal(a.flops, n.flops)
    med = {c: statistics.median(v) * 1e3 for c, v in times.items()}
    for c, m in med.items():
        print(f"b{bs} {c:16s} {m:9.1f} ms  speed-up vs dense eager {med['dense'] / m:5.2f}x", flush=True)
    res[f"b{bs}"] = med
json.dump(res, open(sys.argv[4], "w"), indent=1)
