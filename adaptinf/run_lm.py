"""`adaptinf run --task austen` (or a .txt file): the language-model job, cached stage by stage (issue 19).

Stages, in order, each in its own folder under the run directory (as `adaptinf.run`'s, with its
`Stage` markers: a stage is skipped when its settings, the results it depends on and its outputs are
unchanged; a changed setting reruns it and every stage that uses its result; an interrupted training
resumes from its last checkpoint):
    data/            the byte-level BPE tokenizer trained on the training split (tokenizer/) and the
                     token streams of train / validation / test, cut to the preset's caps (tokens.safetensors)
    dense/           the built-in decoder trained from scratch (`adaptinf.recipes.lm.train_lm`: best/ on
                     validation perplexity); its budget is at least the most-trained method's (the dense
                     training a method starts from plus the method's own), best kept on validation
    points/dense/    its perplexity and FLOPs/token on validation and test
    dense-continued/ (`dense_continue: true`, the default) the dense best trained on with the preset's `train`
                     settings for the most-trained method's epochs (`train_lm`: best/ on validation), so that
                     dense gets the methods' extra training too; points/dense-continued/ its points. The
                     REFERENCE dense model of the whole report (the selection rule, every "vs dense", the
                     latency reference, summary.json's "dense") is whichever of the two has the lower
                     validation perplexity (a tie: the dense stage's); the other is listed beside it
    methods/<name>/  each preset entry: `<X>LM.from_dense(dense/best, config)`, then its recipe's `fit`
                     (adaptinf.recipes.lm_<method>) into methods/<name>/best
    points/<name>/   every knob value (`knob_values()` or the preset's) on validation and test
    latency/         dense and each method's chosen point (cheapest within `max_ppl_increase_pct` of
                     dense's validation perplexity, else its lowest validation perplexity), scoring one
                     window and generating new tokens at each batch size, interleaved (`adaptinf.lm_bench`)
    report/          report.md, points.csv/json, summary.json, perplexity_vs_flops.png,
                     perplexity_vs_latency.png (always rewritten)
    resolved.yaml/json  the run's settings; run.json: what each stage did and how long it took
A method that fails is recorded (methods/<name>/error.txt, the report) and the run goes on; the data or
the dense model failing ends the run.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

from adaptinf.lm_preset import (LMMethodSettings, LMRunConfig, method_config, recipe_module, resolve_lm,
                                train_config, write_resolved_lm)
from adaptinf.run import RunResult, Stage, StageRecord, _Job, _now, _say

TOKENS_FILE = "tokens.safetensors"
CONTINUED = "dense-continued"  # the continued dense model's folder and the name of its points
NOT_CONTINUED = "dense-not-continued"  # the dense stage's points' name when the continued model is the reference


class _LMJob(_Job):
    """What the stages of one LM run share (`_Job.stage` runs each cached stage)."""

    def __init__(self, cfg: LMRunConfig, out: Path, progress: bool, restart: bool):
        self.cfg, self.out, self.progress, self.restart = cfg, out, progress, restart
        self.seed = cfg.data.seed
        self.records: list[StageRecord] = []
        self.total = 3 + 2 * len(cfg.methods) + 1  # data, dense + its points, each method + its points, latency
        self.total += 2 * (continue_fields(cfg) is not None)  # the continued dense model + its points
        self.continued: dict = {}  # the continued dense stage's info
        self.count = 0
        self.evals: dict[str, tuple[str, Path]] = {}  # entry name -> (eval stage key, points folder)
        self.result = RunResult(out=out, report=None, skipped=dict(cfg.skipped))
        self.data = self.tokenizer = None


def run_lm(cfg: LMRunConfig, out: str | Path, progress: bool = True, restart: bool = False) -> RunResult:
    """Run (or resume) the whole LM job for `cfg` into `out`; see the module docstring."""
    from adaptinf.lm_report import add_relative, read_points

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    write_resolved_lm(cfg, out)
    for m, why in cfg.skipped.items():
        _say(f"warning: skipping method {m!r}: {why}")
    _say(f"language-model run: corpus {cfg.data.name}, preset {cfg.preset!r}; methods: "
         f"{', '.join(m.name for m in cfg.methods) or 'none'}")
    job = _LMJob(cfg, out, progress, restart)
    data_key = _data_stage(job)
    job.data, job.tokenizer = load_data(out / "data")
    _say(job.data.summary())
    dense_key = _dense_stage(job, data_key)
    _eval_stage(job, "dense", out / "dense" / "best", [dense_key, data_key], None)
    continued_key = _continued_stage(job, dense_key)
    if continued_key is not None:
        _eval_stage(job, CONTINUED, out / CONTINUED / "best", [continued_key, data_key], None)
    for ms in cfg.methods:
        _method_stages(job, ms, dense_key, data_key)
    points = read_points([folder / "points.json" for _, folder in job.evals.values()])
    _reference_note(job, points, dense_reference(points))
    points = add_relative(points)
    bench, cases = _latency_stage(job, points)
    return _finish(job, points, bench, cases)


# --- data ----------------------------------------------------------------------------------------------


def _data_stage(job: _LMJob) -> str:
    from adaptinf.checkpoint import save_tensors_atomic, write_json_atomic
    from adaptinf.corpus import LMData, lm_corpus, train_tokenizer

    cfg, folder = job.cfg, job.out / "data"
    d = cfg.data

    def build(st: Stage):
        corpus = lm_corpus(d.name)
        tok = train_tokenizer(corpus.texts("train"), cfg.vocab_size)
        data = LMData.from_corpus(corpus, tok)
        cut = {"train": None if d.max_train_tokens is None else d.max_train_tokens,
               "validation": None if d.max_eval_tokens is None else d.max_eval_tokens + 1}
        cut["test"] = cut["validation"]
        streams = {s: data.split(s)[: cut[s]] for s in cut}
        tok.save_pretrained(folder / "tokenizer")
        save_tensors_atomic(streams, folder / TOKENS_FILE)
        info = {"name": data.name, "corpus": corpus.summary(), "vocab_size": len(tok), "eos_id": data.eos_id,
                "tokens": {s: int(t.numel()) for s, t in streams.items()}, "tokens_uncut": data.token_counts()}
        write_json_atomic(folder / "summary.json", info)
        return info

    settings = {"data": d.name, "digest": d.digest(), "vocab_size": cfg.vocab_size,
                "max_train_tokens": d.max_train_tokens, "max_eval_tokens": d.max_eval_tokens}
    key, _ = job.stage("data: tokenizer and token streams", folder, settings, [], build,
                       outputs=(TOKENS_FILE, "tokenizer/tokenizer.json", "summary.json"))
    return key


def load_data(folder: Path):
    """(LMData, tokenizer) of a run's data/ folder."""
    from safetensors.torch import load_file

    from adaptinf.corpus import LMData
    from adaptinf.hf import load_tokenizer

    info = json.loads((folder / "summary.json").read_text())
    streams = load_file(str(folder / TOKENS_FILE))
    tok = load_tokenizer(folder / "tokenizer")
    return LMData(info["name"], streams["train"], streams["validation"], streams["test"], info["eos_id"], len(tok)), tok


# --- the dense LM --------------------------------------------------------------------------------------


def _window(cfg: LMRunConfig, fields: dict) -> int:
    from adaptinf.lm import builtin_lm_config

    return fields["seq_len"] or builtin_lm_config(cfg.model, cfg.vocab_size, 0.0, 0, cfg.decoder).max_positions


def method_tokens(cfg: LMRunConfig, ms: LMMethodSettings, n_train: int) -> int:
    """Training tokens a method's recipe sees: its recipe's `budget_tokens(train_cfg, config, n_train,
    window)` where it has one (phases beyond the training loop), else its steps * batch * window."""
    from adaptinf.corpus import lm_steps_per_epoch

    tc, window = train_config(ms.train, 0), _window(cfg, ms.train)
    hook = getattr(recipe_module(ms.method), "budget_tokens", None)
    if hook is not None:
        return int(hook(tc, method_config(ms, ms.name), n_train, window))
    return tc.total_steps(lm_steps_per_epoch(n_train, tc.batch_size, window)) * tc.batch_size * window


def dense_budget(cfg: LMRunConfig, n_train: int) -> tuple[dict, dict[str, int]]:
    """The dense LM's training fields, its steps raised to at least the most-trained method's budget in
    tokens (the dense training it starts from plus its own), and every method's budget."""
    from adaptinf.corpus import lm_steps_per_epoch

    own = train_config(cfg.dense, 0)
    window = _window(cfg, cfg.dense)
    per_step = own.batch_size * window
    per_epoch = lm_steps_per_epoch(n_train, own.batch_size, window)
    own_steps = own.total_steps(per_epoch)
    budgets = {m.name: own_steps * per_step + method_tokens(cfg, m, n_train) for m in cfg.methods}
    steps = -(-max(budgets.values(), default=0) // per_step)
    if steps <= own_steps:
        return dict(cfg.dense), budgets
    return {**cfg.dense, "epochs": -(-steps // max(1, per_epoch)), "max_steps": steps}, budgets


def _dense_stage(job: _LMJob, data_key: str) -> str:
    from adaptinf.recipes.lm import build_lm, train_lm

    cfg, folder = job.cfg, job.out / "dense"
    fields, budgets = dense_budget(cfg, job.data.train.numel())
    if fields != cfg.dense:
        most = max(budgets, key=budgets.get)
        note = (f"dense: trained for {fields['max_steps']} steps ({budgets[most]:,} tokens: the budget of the "
                f"most-trained method, {most}), the best on validation perplexity kept")
        _say(note)
        job.result.notes.append(note)

    def train(st: Stage):
        tc = train_config(fields, job.seed)
        model = build_lm(job.tokenizer, cfg.model, tc.dropout, job.seed, cfg.decoder)
        model.seq_len = tc.window(model)
        res = train_lm(model, job.data, tc, folder, progress=job.progress,
                       save_extra={"task": {"data": cfg.data.name, "vocab_size": cfg.vocab_size}})
        return {"best_val_perplexity": res.best_val_perplexity, "best_step": res.best_step, "steps": res.steps,
                "train_seconds": round(res.seconds, 1), "method_budgets": budgets}

    settings = {"model": cfg.model, "decoder": cfg.decoder, "train": fields, "seed": job.seed}
    key, _ = job.stage("dense: train from scratch", folder, settings, [data_key], train,
                       outputs=("best/config.json", "best/model.safetensors"))
    return key


def continue_fields(cfg: LMRunConfig) -> dict | None:
    """The continued dense training's fields: the preset's `train` with the most-trained method's epochs
    (None: `dense_continue: false`, or no method to match)."""
    if not cfg.dense_continue or not cfg.methods:
        return None
    return {**cfg.train, "epochs": max(m.train["epochs"] for m in cfg.methods)}


def _continued_stage(job: _LMJob, dense_key: str) -> str | None:
    """The dense best trained on with the methods' settings into dense-continued/ (None: not asked for)."""
    from adaptinf.lm import load_lm
    from adaptinf.recipes.lm import train_lm

    cfg, folder, fields = job.cfg, job.out / CONTINUED, continue_fields(job.cfg)
    if fields is None:
        return None

    def train(st: Stage):
        model = load_lm(job.out / "dense" / "best")  # a copy of the dense best; the methods still start from dense/
        res = train_lm(model, job.data, train_config(fields, job.seed), folder, progress=job.progress,
                       save_extra={"task": {"data": cfg.data.name, "vocab_size": cfg.vocab_size}})
        best = res.best_val_perplexity
        return {"best_val_perplexity": best if math.isfinite(best) else None, "best_step": res.best_step,
                "steps": res.steps, "train_seconds": round(res.seconds, 1)}

    key, job.continued = job.stage("dense: continued", folder, {"train": fields, "seed": job.seed}, [dense_key], train,
                                   outputs=("best/config.json", "best/model.safetensors"))
    return key


def dense_reference(points) -> str | None:
    """Make the continued dense model the reference (its points named `dense`; the dense stage's renamed
    NOT_CONTINUED) when its validation perplexity is lower than the dense stage's. Returns the name of
    the dense model that is not the reference (None: no continued model)."""
    val = {p.name: p.perplexity for p in points if p.split == "validation" and p.name in ("dense", CONTINUED)}
    if CONTINUED not in val:
        return None
    if not val[CONTINUED] < val["dense"]:
        return CONTINUED
    for p in points:
        p.name = {"dense": NOT_CONTINUED, CONTINUED: "dense"}.get(p.name, p.name)
    return NOT_CONTINUED


def _reference_note(job: _LMJob, points, other: str | None) -> None:
    """Point the latency stage's "dense" at the reference's evaluation, and say which dense is the reference."""
    if other is None:
        return
    val = {p.name: p.perplexity for p in points if p.split == "validation" and p.method == "dense"}
    steps, epochs = job.continued.get("steps"), continue_fields(job.cfg)["epochs"]
    how = (f"dense trained {steps} more steps ({epochs} epochs) with the methods' settings (`train`) from the dense "
           f"stage's best, best on validation (`{CONTINUED}/best`)")
    if other == NOT_CONTINUED:
        job.evals["dense"], job.evals[NOT_CONTINUED] = job.evals[CONTINUED], job.evals["dense"]
        del job.evals[CONTINUED]
        note = (f"dense reference: {how} (validation perplexity {val['dense']:.2f} vs {val[NOT_CONTINUED]:.2f} for "
                f"the dense stage's best, listed as `{NOT_CONTINUED}`); the methods start from the dense stage's best")
    else:
        note = (f"dense reference: the dense stage's best (validation perplexity {val['dense']:.2f}); {how} reached "
                f"{val[CONTINUED]:.2f}, not lower (listed as `{CONTINUED}`)")
    _say(note)
    job.result.notes.append(note)


# --- evaluation and methods ----------------------------------------------------------------------------


def _eval_stage(job: _LMJob, name: str, model_dir: Path, deps: list[str], knobs: list[float] | None) -> None:
    """Every knob value of the model in `model_dir` on validation and test into points/<name>/."""
    from adaptinf.lm import evaluate_perplexity, load_lm
    from adaptinf.lm_report import LMPoint, write_points

    folder, bs = job.out / "points" / name, job.cfg.eval_batch_size

    def evaluate(st: Stage):
        model = load_lm(model_dir)
        values = list(knobs) if knobs is not None else list(model.knob_values())
        pts = []
        for k in values:
            with model.using_knob(k):
                for split in ("validation", "test"):
                    s = evaluate_perplexity(model, job.data.split(split), bs, model.seq_len)
                    pts.append(LMPoint(name, model.method, model_dir.relative_to(job.out).as_posix(), k, split,
                                       s.perplexity, s.loss, s.tokens, s.flops_per_token))
            if job.progress:
                _say(f"  {name} knob {'full' if k is None else f'{k:g}'}: validation perplexity {pts[-2].perplexity:.2f}, "
                     f"{pts[-2].flops_per_token / 1e6:.3f} MFLOPs/token")
        write_points(pts, folder)
        return {"points": len(pts)}

    key, _ = job.stage(f"{name}: evaluate", folder, {"batch_size": bs, "knobs": knobs}, deps, evaluate,
                       outputs=("points.json",))
    job.evals[name] = (key, folder)


def _method_stages(job: _LMJob, ms: LMMethodSettings, dense_key: str, data_key: str) -> None:
    """Convert, fit and evaluate one method entry; a failure is recorded and the run goes on."""
    folder = job.out / "methods" / ms.name
    try:
        key = _method_stage(job, ms, folder, [dense_key, data_key])
        _eval_stage(job, ms.name, folder / "best", [key, data_key], ms.knobs)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one method failing must not lose the others' results
        msg = f"{type(e).__name__}: {e}"
        job.result.failed[ms.name] = msg
        job.records.append(StageRecord(ms.name, "failed", 0.0, msg))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
        _say(f"error: method {ms.name!r} failed ({msg}); details in {folder / 'error.txt'}; going on with the others")


def _method_stage(job: _LMJob, ms: LMMethodSettings, folder: Path, deps: list[str]) -> str:
    from adaptinf.lm import load_lm
    from adaptinf.lm_methods import lm_method

    def fit(st: Stage):
        dense = load_lm(job.out / "dense" / "best")
        model = lm_method(ms.method).from_dense(dense, method_config(ms, f"methods.{ms.name}"))
        res = recipe_module(ms.method).fit(model, job.data, train_config(ms.train, job.seed), folder,
                                           progress=job.progress)
        (folder / "error.txt").unlink(missing_ok=True)
        best = getattr(res, "best_val_perplexity", None)
        return {"best_val_perplexity": best if best is None or math.isfinite(best) else None}

    settings = {"method": ms.method, "set": ms.set, "train": ms.train, "seed": job.seed}
    key, _ = job.stage(f"{ms.name}: convert and train", folder, settings, deps, fit,
                       outputs=("best/config.json", "best/model.safetensors"))
    return key


# --- latency and the report ----------------------------------------------------------------------------


DEFAULT_SUFFIX = " (default)"  # a method's knob-None point, timed beside its chosen point


def case_name(name: str, knob: float | None) -> str:
    return name if knob is None else f"{name}@{knob:g}"


def latency_picks(points, max_pct: float) -> list[tuple[str, float | None, str, str]]:
    """(entry name, knob, model dir, why) of dense and each method's point to time."""
    from adaptinf.lm_report import choose_points, fallback_point

    dense = next(p for p in points if p.name == "dense" and p.split == "validation")
    picks = [("dense", None, dense.model_dir, "reference")]
    defaults = {p.name: p for p in points if p.split == "validation" and p.knob is None and p.method != "dense"}
    for name, pick in choose_points(points, max_pct).items():
        if pick is not None:
            picks.append((name, pick[0].knob, pick[0].model_dir, f"cheapest within {max_pct:g}% of dense (validation)"))
        else:
            pick = (fallback_point(points, name),)
            picks.append((name, pick[0].knob, pick[0].model_dir, f"lowest validation perplexity (none within {max_pct:g}%)"))
        if pick[0].knob is not None and name in defaults:  # also the method's own point (PLANER: the searched
            picks.append((name + DEFAULT_SUFFIX, None, defaults[name].model_dir,  # architecture at its latency target)
                          "the method's default operating point (knob None)"))
    return picks


def _latency_stage(job: _LMJob, points) -> tuple[list[dict], dict[str, tuple[str, float | None]]]:
    from adaptinf.lm import load_lm
    from adaptinf.lm_bench import LMCase, lm_latency, write_lm_bench

    cfg, folder = job.cfg, job.out / "latency"
    lat = cfg.latency
    picks = latency_picks(points, cfg.max_ppl_increase_pct)

    def time_points(st: Stage):
        models = {d: load_lm(job.out / d) for d in dict.fromkeys(d for _, _, d, _ in picks)}
        cases = {case_name(n, k): LMCase(models[d], k, n) for n, k, d, _ in picks}
        rows = lm_latency(cases, job.data.test, batch_sizes=tuple(lat.batch_sizes), prompt_tokens=lat.prompt_tokens,
                          new_tokens=lat.new_tokens, repeats=lat.repeats, warmup=lat.warmup, seed=job.seed,
                          progress=job.progress)
        write_lm_bench(rows, folder)
        return {"cases": {case_name(n, k): [n, k, why] for n, k, _, why in picks}}

    job.total = job.count + 1
    settings = {**vars(lat), "picks": [[n, k, why] for n, k, _, why in picks]}
    deps = list(dict.fromkeys(job.evals[n.removesuffix(DEFAULT_SUFFIX)][0] for n, _, _, _ in picks))
    _, info = job.stage("latency: dense and the chosen points", folder, settings, deps, time_points,
                        outputs=("bench.json",))
    bench = json.loads((folder / "bench.json").read_text())
    return bench, {c: (v[0], v[1]) for c, v in info.get("cases", {}).items()}


def _notes(job: _LMJob) -> list[str]:
    cfg, result = job.cfg, job.result
    info = json.loads((job.out / "data" / "summary.json").read_text())
    t = info["tokens"]
    notes = [f"Preset **{cfg.preset}**: {cfg.description}" if cfg.description else f"Preset **{cfg.preset}**."]
    if cfg.note:
        notes.append(f"> {cfg.note}")
    notes.append(f"Corpus `{cfg.data.name}` ({info['corpus']}); BPE vocabulary {info['vocab_size']}; tokens used: "
                 f"train {t['train']:,}, validation {t['validation']:,}, test {t['test']:,}. Model `{cfg.model}` "
                 f"trained from scratch (seed {cfg.data.seed}); every setting in `resolved.yaml`. Perplexity is "
                 "exp of the mean next-token NLL over non-overlapping windows of the model's context.")
    notes += [f"**Note** {n}." for n in result.notes]
    notes += [f"**Skipped** `{m}`: {why}." for m, why in result.skipped.items()]
    notes += [f"**Failed** `{m}`: {err} (see `methods/{m}/error.txt`)." for m, err in result.failed.items()]
    return notes


def _finish(job: _LMJob, points, bench: list[dict], cases: dict) -> RunResult:
    from adaptinf.lm_report import write_lm_report

    result, cfg = job.result, job.cfg
    result.stages = job.records
    stages = [[r.name, r.status + (f": {r.error}" if r.error else ""), f"{r.seconds:.0f}"] for r in result.stages]
    extra = {"preset": cfg.preset, "task": cfg.data.name, "model": cfg.model, "failed": result.failed,
             "skipped": result.skipped}
    paths = write_lm_report(points, job.out / "report", title=f"adaptinf run: {cfg.preset} (language model)",
                            notes=_notes(job), max_pct=cfg.max_ppl_increase_pct, bench=bench, cases=cases,
                            stages=stages, extra=extra)
    result.report = paths["report"]
    (job.out / "run.json").write_text(json.dumps({
        "finished": _now(), "report": str(result.report), "failed": result.failed, "skipped": result.skipped,
        "stages": [vars(r) for r in result.stages]}, indent=2) + "\n")
    return result


# --- the command ---------------------------------------------------------------------------------------

_CLASSIFIER_FLAGS = (("--text-column", "text_column"), ("--label-column", "label_column"),
                     ("--group-column", "group_column"), ("--max-train-samples", "max_train_samples"),
                     ("--max-eval-samples", "max_eval_samples"))


def cli_run(args):
    """`adaptinf run` on a language-modelling corpus (or with an LM preset): the run's `RunResult`
    (the command prints it as it does a classifier run's)."""
    for flag, dest in _CLASSIFIER_FLAGS:
        if getattr(args, dest, None) is not None:
            raise ValueError(f"{flag} is for classification tasks; a language-model run reads its corpus whole (cap "
                             "its tokens with data.max_train_tokens / data.max_eval_tokens in an LM preset)")
    cfg = resolve_lm(args.preset, data=args.data, methods=args.methods, model=args.model, seed=args.seed,
                     epochs=args.epochs)
    return run_lm(cfg, args.out, progress=not args.no_progress, restart=args.restart)
