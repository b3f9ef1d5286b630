"""`adaptinf run` on a language-modelling corpus (adaptinf/run_lm.py, lm_preset.py, lm_bench.py, lm_report.py):
an end-to-end tiny run (a random-words text file, a 300-token tokenizer, a hidden-32 decoder) with dense and
a contract-keeping test method defined here (`TruncLM`: runs the first `knob` layers) writes report.md,
summary.json and the plots; a rerun reuses every stage; a changed setting reruns that stage and what
depends on it; bad presets and flags are one clear error; latency rows are stamped; the selection rule
picks the cheapest point within N% on validation. The real methods (early exit, PLANER, ACM) run end to
end in `test_real_methods_end_to_end`."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from adaptinf import flops
from adaptinf.cli import main
from adaptinf.lm import LanguageModel
from adaptinf.lm_report import LMPoint, add_relative, choose_points
from adaptinf.recipes.lm import train_lm
from lm_text import random_text

QUIET = ["--no-progress", "--threads", "1"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=48)


# --- a test method keeping the contract: the first `knob` layers, then the head ------------------------


@dataclass(frozen=True)
class TruncLMConfig:
    min_layers: int = 1

    def __post_init__(self):
        if not isinstance(self.min_layers, int) or self.min_layers < 1:
            raise ValueError(f"TruncLMConfig.min_layers must be a positive int, got {self.min_layers!r}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = sorted(set(d) - {"min_layers"})
        if unknown:
            raise ValueError(f"TruncLMConfig: unknown fields {unknown}")
        return cls(**d)


class TruncLM(LanguageModel):
    method = "test-trunc"

    def __init__(self, decoder, tokenizer=None, name="custom", seq_len=None, config=None):
        super().__init__(decoder, tokenizer, name, seq_len)
        self.config = config or TruncLMConfig()

    def method_config(self):
        return self.config.to_dict()

    @classmethod
    def from_config(cls, decoder, method_config, name="custom", seq_len=None):
        return cls(decoder, None, name, seq_len, TruncLMConfig.from_dict(method_config))

    @classmethod
    def from_dense(cls, dense, config=None):
        return cls(copy.deepcopy(dense.decoder), dense.tokenizer, dense.name, dense.seq_len, config)

    def knob_values(self):
        return [float(k) for k in range(self.config.min_layers, self.cfg.num_hidden_layers)] + [None]

    def check_knob(self, value):
        if value is not None and value not in [float(k) for k in range(1, self.cfg.num_hidden_layers + 1)]:
            raise ValueError(f"a test-trunc model's knob is a layer count, got {value!r}")
        return value

    def _layers(self):
        return self.cfg.num_hidden_layers if self.knob is None else int(self.knob)

    def _logits(self, ids):
        return self.decoder.head(self.decoder.run_blocks(self.decoder.embed(ids), 0, self._layers()))

    def score(self, inputs, targets):
        logits = self._logits(inputs)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        b, s = inputs.shape
        cost = float(flops.dense_decoder(s, self.cfg, layers=self._layers())) * b
        return nll, torch.as_tensor(cost, dtype=torch.float64)

    def generate(self, input_ids, max_new_tokens, attention_mask=None, **kw):
        ids = input_ids
        for _ in range(max_new_tokens):  # uncached, greedy: enough for a test method
            ids = torch.cat([ids, self._logits(ids)[:, -1].argmax(-1, keepdim=True)], 1)
        return ids


def _fit(model, data, cfg, out_dir, *, progress=True, restart=False, stop_after_steps=None):
    _fit.calls += 1
    return train_lm(model, data, cfg, out_dir, progress=progress, restart=restart, stop_after_steps=stop_after_steps)


_fit.calls = 0


@pytest.fixture(scope="module", autouse=True)
def test_method():
    """Register `test-trunc` (class and recipe) for this module's tests; a fast matmul-rate stamp."""
    from adaptinf import bench, lm_bench
    from adaptinf.lm_methods import LM_METHODS

    recipe = types.ModuleType("adaptinf.recipes.lm_test_trunc")
    recipe.fit = _fit
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(LM_METHODS, "test-trunc", f"{__name__}:TruncLM")
        mp.setitem(sys.modules, "adaptinf.recipes.lm_test_trunc", recipe)
        mp.setattr(lm_bench, "matmul_rate", lambda p="fp32": bench.matmul_rate(p, sizes=(128,), repeats=2))
        yield



def _preset(text_file: Path, **methods) -> dict:
    return {
        "kind": "language-model", "name": "lm-test", "description": "tiny test", "estimated_minutes": 1,
        "model": "gpt-tiny", "decoder": dict(TINY), "vocab_size": 300,
        "data": {"name": str(text_file), "seed": 0},
        "train": {"epochs": 1, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "eval_every": 0, "save_every": 10,
                  "eval_batch_size": 8},
        "evaluate": {"batch_size": 8}, "max_ppl_increase_pct": 5,
        "latency": {"batch_sizes": [1, 2], "prompt_tokens": 4, "new_tokens": 8, "repeats": 2, "warmup": 1},
        "methods": methods or {"trunc": {"method": "test-trunc"},
                               "trunc-b": {"method": "test-trunc", "train": {"lr": 1e-3}}},
    }


def _write(path: Path, preset: dict) -> Path:
    path.write_text(yaml.safe_dump(preset))
    return path


def _run(preset: Path, out: Path, *extra: str) -> int:
    return main(["run", "--preset", str(preset), "--out", str(out), *QUIET, *extra])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "novel.txt"
    path.write_text(random_text(paragraphs=80))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_file):
    d = tmp_path_factory.mktemp("lmrun")
    preset = _write(d / "lm-test.yaml", _preset(text_file))
    assert _run(preset, d / "run") == 0
    return preset, d / "run"


def _statuses(run: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((run / "run.json").read_text())["stages"]}


# --- end to end ----------------------------------------------------------------------------------------


def test_tiny_run_writes_the_report_summary_and_plots(tiny_run):
    _, run = tiny_run
    rep = run / "report"
    for f in ("report.md", "summary.json", "points.csv", "points.json", "perplexity_vs_flops.png",
              "perplexity_vs_latency.png"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    assert (run / "resolved.yaml").is_file() and (run / "dense" / "best" / "config.json").is_file()
    s = json.loads((rep / "summary.json").read_text())
    assert set(s) >= {"dense", "methods", "max_ppl_increase_pct"} and set(s["methods"]) == {"trunc", "trunc-b"}
    assert s["dense"]["val_perplexity"] > 1 and s["dense"]["test_perplexity"] > 1
    assert set(s["dense"]["latency_ms"]) == {"score_b1", "score_b2", "generate_b1", "generate_b2"}
    points = json.loads((rep / "points.json").read_text())
    trunc = [p for p in points if p["name"] == "trunc"]
    assert {(p["knob"], p["split"]) for p in trunc} == {(1.0, "validation"), (1.0, "test"), (None, "validation"),
                                                        (None, "test")}
    one = next(p for p in trunc if p["knob"] == 1.0 and p["split"] == "test")
    assert one["flops_reduction"] > 1.2  # one of two layers, the head on every token
    for name, m in s["methods"].items():
        if m is not None:
            assert m["val_ppl_vs_dense_pct"] <= 5 + 1e-9 and set(m["speedup_vs_dense"]) == set(s["dense"]["latency_ms"])
    md = (rep / "report.md").read_text()
    for text in ("perplexity", "within 5%", "val ppl", "test ppl", "MFLOPs/token", "generate b2",
                 "## Stages", "perplexity_vs_flops.png"):
        assert text in md, text
    assert "accuracy" not in md.lower()
    fallback_line = next((line for line in md.splitlines() if line.startswith("Methods with no point")), "")
    assert "(default)" not in fallback_line  # a method's own point is timed beside its chosen one, not as a fallback


def test_latency_rows_are_stamped_and_interleaved_against_dense(tiny_run):
    _, run = tiny_run
    rows = json.loads((run / "latency" / "bench.json").read_text())
    assert {(r["workload"], r["batch_size"]) for r in rows} == {(w, b) for w in ("score", "generate") for b in (1, 2)}
    for r in rows:
        for k in ("machine", "device", "torch_threads", "torch_version", "python_version", "timestamp",
                  "peak_gflops_per_s"):
            assert r[k] not in (None, ""), k
        assert r["torch_threads"] == 1 and r["repeats"] == 2 and r["warmup"] == 1 and r["reference"] == "dense"
        assert r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        if r["case"] == "dense":
            assert r["paired_speedup_vs_reference"] == pytest.approx(1.0) and r["speedup_vs_reference"] == pytest.approx(1.0)
        if r["workload"] == "generate":
            assert r["new_tokens"] == 8 and r["prompt_tokens"] == 4 and r["flops_per_token"] is None
        else:
            assert r["tokens"] == 16 and r["flops_per_token"] > 0
    knob = (json.loads((run / "report" / "summary.json").read_text())["methods"]["trunc"] or {}).get("knob")
    trunc = {"trunc"} if knob is None else {"trunc@1", "trunc (default)"}  # the chosen point + the method's own point
    assert {r["case"] for r in rows} == {"dense", "trunc-b"} | trunc


def test_a_rerun_reuses_every_stage(tiny_run):
    preset, run = tiny_run
    weights = run / "dense" / "best" / "model.safetensors"
    before, calls = weights.stat().st_mtime_ns, _fit.calls
    assert _run(preset, run) == 0
    assert set(_statuses(run).values()) == {"cached"}
    assert "dense: continued" in _statuses(run)
    assert weights.stat().st_mtime_ns == before and _fit.calls == calls  # nothing retrained
    assert (run / "report" / "report.md").is_file()


def test_a_changed_setting_reruns_that_stage_and_what_depends_on_it(tiny_run, tmp_path):
    preset, run = tiny_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    p = yaml.safe_load(preset.read_text())
    p["methods"]["trunc-b"]["train"]["lr"] = 2e-3
    changed = _write(tmp_path / "changed.yaml", p)
    assert _run(changed, copy_dir) == 0
    st = _statuses(copy_dir)
    assert st["trunc-b: convert and train"] == "ran" and st["trunc-b: evaluate"] == "ran"
    for name in ("data: tokenizer and token streams", "dense: train from scratch", "dense: evaluate",
                 "trunc: convert and train", "trunc: evaluate"):
        assert st[name] == "cached", name
    # the latency stage depends on what it times: rerun only when trunc-b's chosen point is timed (always here)
    assert st["latency: dense and the chosen points"] == "ran"
    p["latency"]["repeats"] = 3  # a latency setting reruns the latency stage alone
    assert _run(_write(tmp_path / "changed2.yaml", p), copy_dir) == 0
    st = _statuses(copy_dir)
    assert st["latency: dense and the chosen points"] == "ran"
    assert {v for k, v in st.items() if not k.startswith("latency")} == {"cached"}


def test_the_dense_budget_is_at_least_the_most_trained_methods(tiny_run):
    from adaptinf.lm_preset import resolve_lm
    from adaptinf.run_lm import dense_budget

    preset, run = tiny_run
    cfg = resolve_lm(str(preset))
    n = 1000
    fields, budgets = dense_budget(cfg, n)
    own = -(-((n - 1) // 16) // 4)  # windows of 16 (+1) in n tokens, batches of 4
    assert budgets == {"trunc": 2 * own * 4 * 16, "trunc-b": 2 * own * 4 * 16}
    assert fields["max_steps"] == 2 * own and fields["epochs"] == 2
    md = (run / "report" / "report.md").read_text()
    assert "the budget of the most-trained method" in md


# --- the continued dense model: the reference when it is better ------------------------------------------


def _val(run: Path, folder: str) -> float:
    return next(p["perplexity"] for p in json.loads((run / "points" / folder / "points.json").read_text())
                if p["split"] == "validation")


def test_the_dense_model_also_gets_the_methods_training_and_the_better_one_is_the_reference(tiny_run):
    from adaptinf.lm_preset import resolve_lm
    from adaptinf.run import STAGE_FILE
    from adaptinf.run_lm import continue_fields

    preset, run = tiny_run
    st = _statuses(run)
    assert st["dense: continued"] in ("ran", "cached") and st["dense-continued: evaluate"] in ("ran", "cached")
    assert (run / "dense-continued" / "best" / "model.safetensors").is_file()
    marker = json.loads((run / "dense-continued" / STAGE_FILE).read_text())
    assert marker["settings"]["train"] == continue_fields(resolve_lm(str(preset)))  # the preset's `train`
    scratch, continued = _val(run, "dense"), _val(run, "dense-continued")
    s = json.loads((run / "report" / "summary.json").read_text())
    ref, other = (("dense-continued", "dense-not-continued") if continued < scratch else ("dense", "dense-continued"))
    assert s["dense"]["model_dir"] == f"{ref}/best"
    assert s["dense"]["val_perplexity"] == pytest.approx(min(scratch, continued), abs=1e-3)
    assert list(s["dense_others"]) == [other]
    assert "dense reference:" in (run / "report" / "report.md").read_text()


def test_continue_fields_are_train_with_the_most_trained_methods_epochs(text_file, tmp_path):
    from adaptinf.lm_preset import resolve_lm
    from adaptinf.run_lm import continue_fields

    p = _preset(text_file, a={"method": "test-trunc", "train": {"epochs": 3, "lr": 1e-4}}, b={"method": "test-trunc"})
    cfg = resolve_lm(str(_write(tmp_path / "p.yaml", p)))
    assert cfg.dense_continue is True
    assert continue_fields(cfg) == {**cfg.train, "epochs": 3} and continue_fields(cfg)["lr"] == 3e-3
    p["dense_continue"] = False
    assert continue_fields(resolve_lm(str(_write(tmp_path / "q.yaml", p)))) is None


def _patch_continued_val(run: Path, ppl: float) -> None:
    path = run / "points" / "dense-continued" / "points.json"
    pts = json.loads(path.read_text())
    for p in pts:
        if p["split"] == "validation":
            p["perplexity"] = ppl
    path.write_text(json.dumps(pts))


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_the_lower_validation_perplexity_decides_the_reference(tiny_run, tmp_path, factor):
    """Forced both ways: the continued model's validation point patched below / above the dense stage's."""
    preset, run = tiny_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    scratch = _val(copy_dir, "dense")
    _patch_continued_val(copy_dir, scratch * factor)
    assert _run(preset, copy_dir) == 0
    st = _statuses(copy_dir)
    assert {v for k, v in st.items() if not k.startswith("latency")} == {"cached"}
    s = json.loads((copy_dir / "report" / "summary.json").read_text())
    md = (copy_dir / "report" / "report.md").read_text()
    points = json.loads((copy_dir / "report" / "points.json").read_text())
    if factor < 1:
        assert s["dense"]["model_dir"] == "dense-continued/best"
        assert s["dense"]["val_perplexity"] == pytest.approx(scratch * factor, abs=1e-3)
        assert s["dense_others"]["dense-not-continued"]["val_perplexity"] == pytest.approx(scratch, abs=1e-3)
        assert s["dense_others"]["dense-not-continued"]["val_ppl_vs_dense_pct"] == pytest.approx(100.0, abs=0.01)
        assert "| dense (`dense-continued/best`) | full |" in md and "dense-not-continued (not the reference)" in md
        assert "listed as `dense-not-continued`" in md
        # every method's "vs dense" is against the continued model now, and nothing is within 5% of half
        assert all(m is None for m in s["methods"].values())
        rows = json.loads((copy_dir / "latency" / "bench.json").read_text())
        assert {r["case"] for r in rows} >= {"dense"}
    else:
        assert s["dense"]["model_dir"] == "dense/best" and list(s["dense_others"]) == ["dense-continued"]
        assert s["dense"]["val_perplexity"] == pytest.approx(scratch, abs=1e-3)
        assert "| dense | full |" in md and "dense-continued (not the reference)" in md
        assert "not lower (listed as `dense-continued`)" in md
    val = [p for p in points if p["split"] == "validation" and p["method"] == "dense"]
    assert sorted(p["name"] for p in val)[0] == "dense" and len(val) == 2
    ref = next(p for p in val if p["name"] == "dense")
    assert ref["ppl_vs_dense_pct"] == pytest.approx(0.0)


def test_dense_continue_false_skips_the_continued_stage(tiny_run, tmp_path):
    preset, run = tiny_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    p = yaml.safe_load(preset.read_text())
    p["dense_continue"] = False
    assert _run(_write(tmp_path / "off.yaml", p), copy_dir) == 0
    st = _statuses(copy_dir)
    assert "dense: continued" not in st and "dense-continued: evaluate" not in st
    assert {v for k, v in st.items() if not k.startswith("latency")} == {"cached"}
    s = json.loads((copy_dir / "report" / "summary.json").read_text())
    assert s["dense"]["model_dir"] == "dense/best" and s["dense_others"] == {}
    assert "dense reference" not in (copy_dir / "report" / "report.md").read_text()
    points = json.loads((copy_dir / "report" / "points.json").read_text())
    assert {p["name"] for p in points if p["method"] == "dense"} == {"dense"}


def test_dense_reference_keeps_the_dense_stage_on_a_tie():
    from adaptinf.run_lm import dense_reference

    pts = [_pt("dense", None, "validation", 100.0, 10.0), _pt("dense", None, "test", 100.0, 10.0)]
    assert dense_reference(list(pts)) is None  # no continued model
    tie = pts + [_pt("dense-continued", None, s, 100.0, 10.0, method="dense") for s in ("validation", "test")]
    assert dense_reference(tie) == "dense-continued" and [p.name for p in tie][:2] == ["dense", "dense"]
    better = [_pt("dense", None, "validation", 100.0, 10.0),
              _pt("dense-continued", None, "validation", 99.0, 10.0, method="dense")]
    assert dense_reference(better) == "dense-not-continued"
    assert [(p.name, p.perplexity) for p in better] == [("dense-not-continued", 100.0), ("dense", 99.0)]
    assert choose_points(add_relative(better), 5.0) == {}  # another dense model is no method entry


# --- selection -----------------------------------------------------------------------------------------


def _pt(name, knob, split, ppl, fpt, method=None):
    return LMPoint(name, method or ("dense" if name == "dense" else "m"), name, knob, split, ppl, 0.0, 10, fpt)


def test_the_selection_rule_takes_the_cheapest_point_within_n_percent_on_validation():
    pts = [_pt("dense", None, "validation", 100.0, 10.0), _pt("dense", None, "test", 110.0, 10.0)]
    for knob, vppl, tppl, fpt in [(0.1, 130.0, 100.0, 2.0), (0.5, 104.9, 200.0, 5.0), (0.7, 105.0, 111.0, 6.0),
                                  (0.9, 101.0, 112.0, 9.0), (None, 99.0, 109.0, 10.0)]:
        pts += [_pt("a", knob, "validation", vppl, fpt), _pt("a", knob, "test", tppl, fpt)]
    pts += [_pt("b", None, "validation", 106.0, 4.0), _pt("b", None, "test", 100.0, 4.0)]
    add_relative(pts)
    chosen = choose_points(pts, 5.0)
    v, t = chosen["a"]
    assert v.knob == 0.5 and v.split == "validation" and t.split == "test" and t.perplexity == 200.0  # test never chooses
    assert chosen["b"] is None  # 6% worse on validation, even though better on test
    assert choose_points(pts, 6.0)["b"][0].perplexity == 106.0
    assert choose_points(pts, 0.0)["a"][0].knob is None  # only points at or below dense
    same_cost = pts + [_pt("c", 1.0, "validation", 104.0, 5.0), _pt("c", 2.0, "validation", 102.0, 5.0)]
    assert choose_points(same_cost, 5.0)["c"][0].knob == 2.0  # a tie in FLOPs goes to the lower perplexity
    assert t.ppl_vs_dense_pct == pytest.approx(100 * (200 / 110 - 1))
    with pytest.raises(ValueError, match="exactly one dense point"):
        choose_points([p for p in pts if p.method != "dense"], 5.0)


def test_latency_times_each_chosen_point_and_the_methods_own_point():
    """Dense, each method's chosen point, and (where that is not the method's default) its knob-None
    point too: PLANER's searched architecture is what its latency target is about."""
    from adaptinf.run_lm import latency_picks

    pts = [_pt("dense", None, "validation", 100.0, 10.0), _pt("dense", None, "test", 100.0, 10.0)]
    for name, knob, ppl, fpt in [("a", 1, 104.0, 5.0), ("a", None, 103.0, 6.0), ("b", None, 101.0, 7.0),
                                 ("c", 2, 120.0, 4.0), ("c", None, 110.0, 9.0)]:
        pts += [_pt(name, knob, "validation", ppl, fpt), _pt(name, knob, "test", ppl, fpt)]
    add_relative(pts)
    picks = [(n, k, why.split(" ")[0]) for n, k, _, why in latency_picks(pts, 5.0)]
    assert picks == [("dense", None, "reference"), ("a", 1, "cheapest"), ("a (default)", None, "the"),
                     ("b", None, "cheapest"), ("c", None, "lowest")]


# --- errors --------------------------------------------------------------------------------------------


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize("change, expected", [
    (lambda p: p.update(bogus=1), "unknown key(s) ['bogus']"),
    (lambda p: p["train"].update(lrr=1), "did you mean 'lr'"),
    (lambda p: p["train"].update(batch_size=0), "LMTrainConfig.batch_size"),
    (lambda p: p["train"].update(seq_len=64), "exceeds the model's context of 48"),
    (lambda p: p.update(methods={"x": {"method": "planr"}}), "did you mean 'planer'"),
    (lambda p: p.update(methods={"dense": {}}), "other than 'dense'"),
    (lambda p: p.update(methods={"t": {"method": "test-trunc", "set": {"nope": 1}}}), "unknown fields ['nope']"),
    (lambda p: p.update(methods={"t": {"method": "test-trunc", "set": {"min_layers": 0}}}), "min_layers must be"),
    (lambda p: p.update(decoder={"hidden_size": 30}), "divisible"),
    (lambda p: p.update(max_ppl_increase_pct="five"), "max_ppl_increase_pct must be a number"),
    (lambda p: p["latency"].update(batch_sizes=[]), "batch_sizes must be a non-empty list"),
    (lambda p: p["data"].update(max_train_tokens=3), "at least 16"),
    (lambda p: p.update(dense_continue="yes"), "dense_continue must be true or false"),
    (lambda p: p.update(dense_continu=True), "did you mean 'dense_continue'"),
])
def test_bad_presets_are_one_clear_error(text_file, tmp_path, capsys, change, expected):
    p = _preset(text_file)
    change(p)
    assert _run(_write(tmp_path / "bad.yaml", p), tmp_path / "out") == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "out" / "dense").exists()  # refused before any work


def test_presets_and_tasks_of_the_other_kind_are_refused(text_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["run", "--task", "austen", "--preset", "quick", "--out", out, *QUIET]) == 2
    assert "preset 'quick' is a classifier preset but task austen is a language-modelling corpus; use --preset lm-quick" in _error(capsys)
    assert main(["run", "--task", str(text_file), "--preset", "vision-quick", "--out", out, *QUIET]) == 2
    assert "classifier preset" in _error(capsys)
    assert main(["run", "--task", "rotten-tomatoes", "--preset", "lm-quick", "--out", out, *QUIET]) == 2
    assert "preset 'lm-quick' is a language-model preset but task rotten-tomatoes is a classification task" in _error(capsys)
    preset = _write(tmp_path / "p.yaml", _preset(text_file))
    cases = [(["--max-train-samples", "10"], "--max-train-samples is for classification tasks"),
             (["--text-column", "t"], "--text-column is for classification tasks"),
             (["--methods", "trunc,nope"], "unknown method(s) ['nope'] in --methods"),
             (["--model", "minilm-l6"], "trains a built-in decoder from scratch"),
             (["--task", str(tmp_path / "missing.txt")], "no such file"),
             (["--methods", ""], "--methods is empty")]
    for flags, expected in cases:
        assert _run(preset, tmp_path / "out", *flags) == 2, flags
        assert expected in _error(capsys), flags
    assert main(["finetune", "--task", "austen", "--out", out, *QUIET]) == 2
    assert "adaptinf run --task austen" in _error(capsys)


def test_an_unavailable_method_is_skipped_with_all_and_refused_by_name(text_file, tmp_path, capsys, monkeypatch):
    from adaptinf.lm_methods import LM_METHODS
    from adaptinf.lm_preset import resolve_lm

    monkeypatch.setitem(LM_METHODS, "test-missing", "adaptinf.no_such_module:Nothing")
    p = _preset(text_file, trunc={"method": "test-trunc"}, gone={"method": "test-missing"})
    path = _write(tmp_path / "p.yaml", p)
    cfg = resolve_lm(str(path))
    assert [m.name for m in cfg.methods] == ["trunc"] and "not available" in cfg.skipped["gone"]
    with pytest.raises(ValueError, match="--methods gone: .*not available"):
        resolve_lm(str(path), methods="gone")


def test_a_failing_method_is_recorded_and_the_run_goes_on(text_file, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")

    p = _preset(text_file, trunc={"method": "test-trunc"}, broken={"method": "test-trunc", "set": {"min_layers": 2}})
    preset = _write(tmp_path / "p.yaml", p)
    real = TruncLM.from_dense.__func__

    def from_dense(cls, dense, config=None):
        if config.min_layers == 2:
            broken()
        return real(cls, dense, config)

    monkeypatch.setattr(TruncLM, "from_dense", classmethod(from_dense))
    assert _run(preset, tmp_path / "run") == 1
    assert "method(s) broken failed" in capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    assert s["methods"]["broken"] is None and "boom" in s["failed"]["broken"]
    assert "boom" in (tmp_path / "run" / "methods" / "broken" / "error.txt").read_text()
    assert "**Failed** `broken`" in (tmp_path / "run" / "report" / "report.md").read_text()


# --- generate --knob ------------------------------------------------------------------------------------


def test_generate_takes_a_knob_for_method_models(tiny_run, capsys):
    _, run = tiny_run
    model = run / "methods" / "trunc" / "best"
    assert main(["generate", str(model), "--prompt", "The lady", "--greedy", "--knob", "1",
                 "--max-new-tokens", "5", *QUIET]) == 0
    assert capsys.readouterr().out.startswith("The lady")
    assert main(["generate", str(model), "--prompt", "The lady", "--knob", "7", *QUIET]) == 2
    assert "knob is a layer count" in _error(capsys)
    assert main(["generate", str(run / "dense" / "best"), "--prompt", "The lady", "--knob", "1", *QUIET]) == 2
    assert "has no knob" in _error(capsys)


def test_the_builtin_lm_presets_resolve():
    from adaptinf.lm_preset import resolve_lm

    quick, full = resolve_lm("lm-quick"), resolve_lm("lm-full")
    assert quick.data.max_train_tokens and full.data.max_train_tokens is None
    assert quick.method("ee").knobs[0] == 0.0 and quick.method("ee").knobs[-1] is None
    for cfg in (quick, full):
        assert [m.name for m in cfg.methods] == ["ee", "planer-0.7", "planer-0.5", "acm"] and not cfg.skipped
        assert cfg.estimated_minutes > 0
    assert {m.name: m.set["latency_target"] for m in full.methods if m.method == "planer"} == {"planer-0.7": 0.7,
                                                                                               "planer-0.5": 0.5}


# --- the real methods ------------------------------------------------------------------------------------


def test_real_methods_end_to_end(text_file, tmp_path):
    """Early exit, PLANER and ACM through the whole run on the tiny corpus (short phases)."""
    methods = {
        "ee": {"method": "early-exit"},
        "planer-0.5": {"method": "planer", "set": {"latency_target": 0.5, "num_experts": 4, "moe_ks": [1, 2],
                                                    "latency_repeats": 1,
                                                    "candidates": 1, "candidate_steps": 2, "router_steps": 3,
                                                    "refit_steps": 1, "proxy_windows": 2, "cache_tokens": 8}},
        "acm": {"method": "acm", "set": {"distill_steps": 3, "gate_steps": 3}},
    }
    preset = _write(tmp_path / "p.yaml", _preset(text_file, **methods))
    rc = _run(preset, tmp_path / "run")
    assert rc == 0, [f.read_text()[-2000:] for f in (tmp_path / "run" / "methods").glob("*/error.txt")]
    s = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    assert set(s["methods"]) == set(methods)
    points = json.loads((tmp_path / "run" / "report" / "points.json").read_text())
    assert {p["method"] for p in points} == {"dense", "early-exit", "planer", "acm"}
