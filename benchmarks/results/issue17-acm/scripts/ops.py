import torch, collections
torch.set_num_threads(1)
from torch.profiler import profile, ProfilerActivity
from adaptinf.steps import dense_from_pretrained
from adaptinf.methods.acm import AcmClassifier, AcmConfig
dense, _ = dense_from_pretrained("minilm-l6", ["a", "b"], 64, 0.1, 0); dense.eval()
acm = AcmClassifier.from_dense(dense, AcmConfig()).eval()
ids = torch.randint(1000, 20000, (1, 27)); mask = torch.ones(1, 27, dtype=torch.int64)
for name, f in (("dense", lambda: dense(ids, mask)), ("acm", lambda: acm(ids, mask, knob=0.2))):
    with torch.inference_mode():
        f()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            f()
    ev = [e for e in p.events() if e.cpu_parent is None]
    c = collections.Counter(e.name for e in ev)
    print(name, "top-level ops", len(ev), sum(e.cpu_time_total for e in ev) / 1e3, "ms")
    print("  ", c.most_common(40))
