"""PLANER's recipe on the decoder (the PLANER paper, Latifi et al., 2022): what turns a converted
`adaptinf.lm_methods.planer.PlanerLM` into one that meets a latency target.

`fit` (each step kept in out_dir and resumed when rerun; `restart` clears them):
1. routers (routers.json + routers.safetensors): each layer's router fitted to its experts' output
   norms on the dense model's FFN inputs (`router_steps` Adam steps on training windows; the
   classifier recipe's `router_step`: targets relative to the token's mean norm, MSE);
2. latency tables (latency_generate.json, latency_score.json; `adaptinf.recipes.latency_table.LatencyTable`):
   every candidate block timed on this machine as a stack (that block in every layer, the other slot
   skipped, minus the all-skipped overhead), interleaved rounds, median; "generate" is one decoding
   step at batch 1 (one new token after `cache_tokens` cached ones, then the LM head), "score" one
   window of the model's seq_len at batch 1. Re-profiled when taken under other conditions. The
   target is `latency_target` x the dense model's generation step (the "generate" table);
3. search (search.json): greedy descents (the classifier recipe's `descend` / `refine_search`: the
   downgrade with the least proxy increase per millisecond saved until the estimate meets
   (1 - search_margin) * target, then the best upgrades that still fit), proxy = mean KL(dense ||
   candidate) of the next-token distributions on `proxy_windows` validation windows (zero-shot);
   one descent over every block, then with every FFN kept, with every attention kept, with nothing
   skipped, up to `candidates` distinct results that meet the aim; each measured (generation step,
   interleaved with dense);
4. candidates (candidates.json, candidates/<i>/): each distilled for `candidate_steps` steps from the
   converted weights (`train_lm`), the lowest validation perplexity kept with its weights (the
   trained proxy: zero-shot KL favours dropping whole blocks, which distillation recovers worst);
5. routers refitted on the student's own FFN inputs (refit_search.*), distillation (distill/,
   `train_lm`: `PlanerLM.training_loss`, the teacher held by the model), routers refitted again
   (refit_final.*);
6. the result in out/best (`adaptinf.lm.load_lm`), validation perplexity of it and of the dense
   model, its measured latency (generation step and scoring, interleaved with dense) in summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptinf.bench import interleaved_rounds, time_call, warm_up
from adaptinf.checkpoint import WEIGHTS_FILE, save_tensors_atomic, write_json_atomic
from adaptinf.corpus import LMData, lm_batches, lm_eval_batches
from adaptinf.decoder import KVCache
from adaptinf.lm import evaluate_perplexity
from adaptinf.lm_methods.planer import PlanerLM
from adaptinf.recipes.finetune import Stage
from adaptinf.recipes.latency_table import LatencyTable, conditions
from adaptinf.recipes.lm import LMTrainConfig, train_lm
from adaptinf.recipes.planer import descend, monotone_table, block_options, SearchPoint, refine_search, router_step

STAGES = ("routers", "latency_generate", "latency_score", "search", "candidates", "refit_search", "refit_final", "final",
          "summary")
DIRS = ("candidates", "distill", "best")
# a timing sample is the mean of enough calls to last this long: a decoding step is ~1 ms, and on a
# machine shared with other processes 2 ms samples ranked MoE blocks 6x apart at random
SAMPLE_MS = 20.0
VARIANTS = (("greedy", None), ("ffn_kept", lambda b: b != "ffn:skip"), ("attn_kept", lambda b: b != "attn:skip"),
            ("no_skip", lambda b: not b.endswith(":skip")))


@dataclass
class PlanerFitResult:
    """What `fit` made: the model's validation perplexity (None when a `stop_after_steps` call stopped
    before the end), the dense model's, the architecture and the summary written to out/summary.json."""

    best_val_perplexity: float | None
    dense_val_perplexity: float | None
    architecture: list[str]
    finished: bool
    out_dir: Path
    summary: dict


def fit(model: PlanerLM, data: LMData, cfg: LMTrainConfig, out_dir: str | os.PathLike, *, progress: bool = True,
        restart: bool = False, stop_after_steps: int | None = None) -> PlanerFitResult:
    """Routers, latency tables, search, candidate distillation, distillation (see the module
    docstring). Every stage resumes from out_dir; `stop_after_steps` ends the call after that many
    training steps (over the candidate and final distillations), as an interruption would."""
    if not model._teacher:
        raise ValueError("PLANER's recipe needs the dense model: build the model with PlanerLM.from_dense")
    out = Path(out_dir)
    if restart:
        for name in STAGES:
            for suffix in (".json", ".safetensors"):
                (out / f"{name}{suffix}").unlink(missing_ok=True)
        for name in DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    seq_len = cfg.window(model)
    summary: dict = {"routers": _routers(model, data, cfg, out, progress)}
    tables = {mode: _table(model, mode, seq_len, out) for mode in ("generate", "score")}
    dense_ms = tables["generate"].dense_ms(model.cfg.num_hidden_layers)
    target = model.config.latency_target * dense_ms
    summary.update(latency_target=model.config.latency_target, dense_generate_ms_estimated=dense_ms,
                   target_ms=target)
    summary["search"] = _search(model, tables["generate"], target, data, seq_len, out, progress)
    budget = [stop_after_steps]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if len(summary["search"]["candidates"]) > 1 and model.config.candidate_steps:
        summary["candidates"] = _pick(model, base, summary["search"]["candidates"], data, cfg, out, budget, progress)
        if summary["candidates"] is None:
            return _partial(model, out, summary)
    else:
        model.set_architecture(summary["search"]["candidates"][0]["architecture"])
    summary["refit_search"] = _refit(model, data, seq_len, out, "refit_search")
    if budget[0] is not None and budget[0] <= 0:
        return _partial(model, out, summary)
    result = train_lm(model, data, cfg, out / "distill", progress=progress, stop_after_steps=budget[0],
                      extra_settings={"planer": {"architecture": model.architecture,
                                                 "start": _digest(model.state_dict())}})
    if result.steps < result.total_steps and not result.stopped_early:
        return _partial(model, out, summary)
    _load(model, out / "distill" / "best")
    summary["refit_final"] = _refit(model, data, seq_len, out, "refit_final")
    return _finish(model, data, cfg, tables, target, out, summary)


def _partial(model: PlanerLM, out: Path, summary: dict) -> PlanerFitResult:
    return PlanerFitResult(None, None, model.architecture, False, out, summary)


def _finish(model: PlanerLM, data: LMData, cfg: LMTrainConfig, tables: dict, target: float, out: Path,
            summary: dict) -> PlanerFitResult:
    """Save out/best, score it and the dense model on validation, measure both (interleaved)."""
    stage = Stage(out, "final", {"weights": _digest(model.state_dict()), "eval_tokens": cfg.eval_tokens})
    if stage.result() is None:
        seq_len, teacher = cfg.window(model), model._teacher[0]
        val = evaluate_perplexity(model, data.validation, cfg.eval_batch_size, seq_len, cfg.eval_tokens or None)
        dense = evaluate_perplexity(teacher, data.validation, cfg.eval_batch_size, seq_len, cfg.eval_tokens or None)
        layers, arch = model.cfg.num_hidden_layers, model.architecture
        measured = {}
        for mode, table in tables.items():
            ms = measure(model, {"planer": arch, "dense": ["full/dense"] * layers}, mode, model.config.cache_tokens,
                         seq_len, 2 * model.config.latency_repeats)
            measured[mode] = {"estimated_ms": table.estimate(arch), "estimated_vs_dense": table.estimate(arch) / table.dense_ms(layers),
                              "measured_ms": ms["planer"], "dense_measured_ms": ms["dense"],
                              "measured_vs_dense": ms["planer"] / ms["dense"]}
        stage.finish({"architecture": arch, "val_perplexity": val.perplexity, "dense_val_perplexity": dense.perplexity,
                      "val_tokens": val.tokens, "flops_per_token": val.flops_per_token,
                      "dense_flops_per_token": teacher.flops_per_token(seq_len), "latency": measured,
                      "latency_target_met_estimate": tables["generate"].estimate(arch) <= target,
                      "latency_target_met_measured": measured["generate"]["measured_vs_dense"] <= model.config.latency_target})
    final = stage.result()
    model.save(out / "best", extra={"val_perplexity": final["val_perplexity"], "planer": final["latency"]})
    summary["result"] = final
    write_json_atomic(out / "summary.json", summary)
    return PlanerFitResult(final["val_perplexity"], final["dense_val_perplexity"], model.architecture, True, out, summary)


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().flatten()[:4096].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load(model: PlanerLM, directory: Path) -> None:
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))


# --- routers ------------------------------------------------------------------------------------------


def ffn_inputs(lm, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer -> the FFN input [T, d] (after the block's LayerNorm) of every token of windows inputs
    [b, s], in a forward of `lm` (a dense model or a PlanerLM at its architecture; skipped FFNs absent)."""
    got: dict[int, torch.Tensor] = {}

    def keep(i):
        return lambda mod, args: got.__setitem__(i, mod.inp(args[0]).reshape(-1, args[0].shape[-1]))

    hooks = [blk.ffn.register_forward_pre_hook(keep(i)) for i, blk in enumerate(lm.decoder.blocks)]
    try:
        with torch.no_grad():
            lm.decoder.hidden(inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


def train_routers(model: PlanerLM, data: LMData, seq_len: int, steps: int, batch: int, on_student: bool = False,
                  seed: int = 0, progress: bool = False) -> dict:
    """`steps` Adam steps of every layer's router on FFN inputs of training windows: the dense
    teacher's, or with `on_student` the model's own (eval mode, knob None; skipped FFNs left as they
    are). Returns per layer the last pass's unexplained variance and top-1 agreement."""
    c, layers = model.config, model.cfg.num_hidden_layers
    source = model if on_student else model._teacher[0]
    opts = [torch.optim.Adam(r.parameters(), lr=c.router_lr) for r in model.routers]
    sums = [[0.0, 0.0, 0.0, 0] for _ in range(layers)]
    was_training, knob = model.training, model.knob
    model.eval()
    model.knob = None
    for r in model.routers:
        r.requires_grad_(True)
    bar = tqdm(total=steps, desc="planer routers" + (" (student)" if on_student else ""), disable=not progress)
    try:
        epoch, done = 0, 0
        while done < steps:
            for b in lm_batches(data.train, batch, seq_len, seed, epoch):
                sums = [[0.0, 0.0, 0.0, 0] for _ in range(layers)] if done % 10 == 0 else sums
                for i, x in ffn_inputs(source, b.inputs).items():
                    router_step(model, i, x, opts[i], sums[i])
                done += 1
                bar.update(1)
                if done >= steps:
                    break
            epoch += 1
    finally:
        bar.close()
        for r in model.routers:
            r.requires_grad_(False)
        model.train(was_training)
        model.knob = knob
    return {str(i): {"unexplained_variance": s[0] / max(s[1], 1e-30), "top1_agreement": s[2] / max(s[3], 1)}
            for i, s in enumerate(sums) if s[3]}


def _routers(model: PlanerLM, data: LMData, cfg: LMTrainConfig, out: Path, progress: bool) -> dict:
    c = model.config
    settings = {"num_experts": c.num_experts, "router_hidden": c.router_hidden, "kmeans_iters": c.kmeans_iters,
                "steps": c.router_steps, "lr": c.router_lr, "batch": c.router_batch, "seq_len": cfg.window(model),
                "seed": cfg.seed, "train_tokens": data.train.numel()}
    stage, weights = Stage(out, "routers", settings), out / "routers.safetensors"
    if stage.result() is None or not weights.is_file():
        stats = train_routers(model, data, cfg.window(model), c.router_steps, c.router_batch, seed=cfg.seed,
                              progress=progress)
        save_tensors_atomic(_router_state(model), weights)
        stage.finish(stats)
    _load_routers(model, weights)
    return stage.result()


def _router_state(model: PlanerLM) -> dict:
    return {f"{i}.{k}": v for i, r in enumerate(model.routers) for k, v in r.state_dict().items()}


def _load_routers(model: PlanerLM, path: Path) -> None:
    state = load_file(str(path))
    for i, r in enumerate(model.routers):
        r.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})


def _refit(model: PlanerLM, data: LMData, seq_len: int, out: Path, name: str) -> dict | None:
    """Routers refitted on the student's own FFN inputs (its architecture and weights), kept in <name>.*."""
    c = model.config
    if not c.refit_steps or all(f == "skip" for _, f, _ in model._arch):
        return None
    stage = Stage(out, name, {"architecture": model.architecture, "steps": c.refit_steps, "weights": _digest(model.state_dict())})
    weights = out / f"{name}.safetensors"
    if stage.result() is None or not weights.is_file():
        stats = train_routers(model, data, seq_len, c.refit_steps, c.router_batch, on_student=True, seed=1)
        save_tensors_atomic(_router_state(model), weights)
        stage.finish(stats)
    _load_routers(model, weights)
    return stage.result()


# --- latency ------------------------------------------------------------------------------------------


@torch.inference_mode()
def measure(model: PlanerLM, archs: dict[str, list[str]], mode: str, cache_tokens: int, window: int,
            repeats: int = 5, warmup: int = 2, batch: int = 1) -> dict[str, float]:
    """Milliseconds of each architecture (the bench protocol: warm-up discarded, interleaved rounds,
    samples of at least SAMPLE_MS, median) for `mode` "generate" (one decoding step after
    `cache_tokens` cached tokens, then the LM head) or "score" (a window of `window` tokens), at `batch`."""
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', got {mode!r}")
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    cache_tokens = min(cache_tokens, cfg.max_positions - 1)  # a decoder of a shorter context: its longest cache
    if mode == "generate":
        cache = KVCache.empty(cfg, batch, cache_tokens + 1)
        tok = torch.randint(1, cfg.vocab_size, (batch, 1), generator=g)

        def call():
            cache.length = cache_tokens
            cache.positions.fill_(cache_tokens)
            return model.decoder.head(model.decoder.hidden(tok, None, cache)[:, -1])
    else:
        ids = torch.randint(1, cfg.vocab_size, (batch, window), generator=g)

        def call():
            return model.decoder.head(model.decoder.hidden(ids))

    def run(arch):
        with model.using_architecture(arch):
            call()

    def sample(arch) -> float:
        with model.using_architecture(arch):
            return time_call(call, min_sample_ms=SAMPLE_MS)

    was_training, knob = model.training, model.knob
    model.eval()
    model.knob = None
    try:
        warm_up({n: functools.partial(run, a) for n, a in archs.items()}, warmup)
        samples = interleaved_rounds({n: functools.partial(sample, a) for n, a in archs.items()}, repeats)
    finally:
        model.train(was_training)
        model.knob = knob
    return {n: statistics.median(v) for n, v in samples.items()}


def _shape(model: PlanerLM, mode: str, window: int) -> dict:
    c = model.config
    return {**model.cfg.to_dict(), "num_experts": c.num_experts, "router_hidden": c.router_hidden,
            "mode": mode, "cache_tokens": c.cache_tokens if mode == "generate" else 0, "choices": model.block_choices()}


def profile(model: PlanerLM, mode: str, window: int) -> LatencyTable:
    """Every candidate block timed as a stack (see the module docstring) -> a LatencyTable for `mode`."""
    layers = model.cfg.num_hidden_layers
    stacks = {"overhead": ["skip/skip"] * layers}
    for name in model.block_choices():
        kind, choice = name.split(":")
        if choice != "skip":
            stacks[name] = [f"{choice}/skip" if kind == "attn" else f"skip/{choice}"] * layers
    ms = measure(model, stacks, mode, model.config.cache_tokens, window, model.config.latency_repeats)
    overhead = ms.pop("overhead")
    seq = 1 if mode == "generate" else window
    return LatencyTable(**conditions(1, seq), shape=_shape(model, mode, window), overhead_ms=overhead,
                        blocks={n: max(t - overhead, 0.0) / layers for n, t in ms.items()},
                        repeats=model.config.latency_repeats,
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _table(model: PlanerLM, mode: str, window: int, out: Path) -> LatencyTable:
    path = out / f"latency_{mode}.json"
    table = LatencyTable.load(path) if path.is_file() else None
    if table is None or table.mismatches(1, 1 if mode == "generate" else window, _shape(model, mode, window)):
        table = monotone_table(profile(model, mode, window))
        table.save(path)
    return table


# --- search -------------------------------------------------------------------------------------------


class _LMProxy:
    """The search's zero-shot proxy: mean KL(dense || candidate) of the next-token distributions over
    fixed validation windows (0 for the dense architecture); per-layer states cached, so a candidate
    that changes layer l reruns only layers l.. (the classifier recipe's `_Proxy` interface)."""

    def __init__(self, model: PlanerLM, windows: torch.Tensor):
        self.model, self.layers = model, model.cfg.num_hidden_layers
        with torch.no_grad():
            h0 = model.decoder.embed(windows)
            self.ref = F.log_softmax(model._teacher[0](windows).logits.float(), -1)  # [b, s, V]
        self.tokens = windows.numel()
        dense = ["full/dense"] * self.layers
        self.dense = self.point(dense, 0, SearchPoint(dense, [[h0]], 0.0))

    @torch.no_grad()
    def point(self, arch: list[str], start: int, base: SearchPoint) -> SearchPoint:
        states = [list(s) for s in base.states[: start + 1]]
        with self.model.using_architecture(arch):
            h = states[start][0]
            for l in range(start, self.layers):
                h = self.model.decoder.run_blocks(h, l, l + 1)
                states.append([h])
            logp = F.log_softmax(self.model.decoder.head(h).float(), -1)
        kl = F.kl_div(logp, self.ref, log_target=True, reduction="sum") / self.tokens
        return SearchPoint(list(arch), states, float(kl))


def search(model: PlanerLM, table: LatencyTable, aim: float, windows: torch.Tensor, progress: bool = False) -> list[dict]:
    """Greedy descents under `aim` ms (the table's estimate) for each of `VARIANTS` (blocks allowed),
    up to `candidates` distinct results (the first always kept; the others only if they meet the aim)."""
    was_training, knob = model.training, model.knob
    model.eval()
    model.knob = None
    found: list[dict] = []
    bar = tqdm(desc="planer search", disable=not progress, unit="candidate")
    try:
        ev = _LMProxy(model, windows)
        for name, only in VARIANTS:
            if len(found) >= model.config.candidates:
                break
            options, path = block_options(model, table, only), []
            cur = refine_search(ev, descend(ev, ev.dense, table, aim, options, bar, path), table, aim, options, bar, path)
            est = table.estimate(cur.arch)
            if (found and est > aim) or any(f["architecture"] == cur.arch for f in found):
                continue
            found.append({"variant": name, "architecture": cur.arch, "estimated_ms": est, "proxy_kl": cur.proxy,
                          "meets_target_estimate": est <= aim, "path": path})
    finally:
        bar.close()
        model.train(was_training)
        model.knob = knob
    return found


def _search(model: PlanerLM, table: LatencyTable, target: float, data: LMData, seq_len: int, out: Path,
            progress: bool) -> dict:
    c, layers = model.config, model.cfg.num_hidden_layers
    if c.architecture and list(c.architecture) != ["full/dense"] * layers:
        return {"candidates": [{"variant": "given", "architecture": list(c.architecture),
                                "estimated_ms": table.estimate(c.architecture)}]}
    aim = (1 - c.search_margin) * target
    stage = Stage(out, "search", {"aim_ms": aim, "table": table.created, "routers": _digest(
        {str(i): p for i, p in enumerate(r.net[0].weight for r in model.routers)}), "proxy_windows": c.proxy_windows,
        "candidates": c.candidates, "options": model.block_choices(), "seq_len": seq_len})
    if stage.result() is None:
        stream = data.validation[: c.proxy_windows * seq_len + 1]
        windows = next(iter(lm_eval_batches(stream, c.proxy_windows, seq_len))).inputs
        found = search(model, table, aim, windows, progress)
        archs = {str(i): f["architecture"] for i, f in enumerate(found)}
        ms = measure(model, {**archs, "dense": ["full/dense"] * layers}, "generate", c.cache_tokens, seq_len,
                     c.latency_repeats)
        for i, f in enumerate(found):
            f.update(measured_ms=ms[str(i)], measured_vs_dense=ms[str(i)] / ms["dense"],
                     estimated_vs_dense=f["estimated_ms"] / table.dense_ms(layers))
        stage.finish({"aim_ms": aim, "candidates": found})
    return stage.result()


def _pick(model: PlanerLM, base: dict, cands: list[dict], data: LMData, cfg: LMTrainConfig, out: Path,
          budget: list, progress: bool) -> dict | None:
    """Each candidate distilled for `candidate_steps` steps from the converted weights (its own
    train_lm folder, resumable); the lowest validation perplexity is set on the model with its
    weights. None when the step budget ran out first."""
    steps = model.config.candidate_steps
    ccfg = dataclasses.replace(cfg, epochs=1, max_steps=steps, eval_every=0, patience=0)
    stage = Stage(out, "candidates", {"architectures": [c["architecture"] for c in cands], "steps": steps,
                                      "base": _digest(base), "train": ccfg.to_dict()})
    if stage.result() is None:
        rows = []
        for i, cand in enumerate(cands):
            if budget[0] is not None and budget[0] <= 0:
                return None
            model.load_state_dict(base)
            model.set_architecture(cand["architecture"])
            r = train_lm(model, data, ccfg, out / "candidates" / str(i), progress=progress, stop_after_steps=budget[0],
                         extra_settings={"planer": {"architecture": cand["architecture"]}})
            if budget[0] is not None:
                budget[0] -= r.steps - r.resumed_from_step
            if r.steps < r.total_steps and not r.stopped_early:
                return None
            rows.append({"variant": cand["variant"], "architecture": cand["architecture"],
                         "val_perplexity": r.best_val_perplexity, "proxy_kl": cand.get("proxy_kl")})
        picked = min(range(len(rows)), key=lambda i: (rows[i]["val_perplexity"], i))
        stage.finish({"candidates": rows, "picked": picked})
    record = stage.result()
    model.load_state_dict(base)
    model.set_architecture(record["candidates"][record["picked"]]["architecture"])
    _load(model, out / "candidates" / str(record["picked"]) / "best")
    return record
