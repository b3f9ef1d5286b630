"""PLANER's recipe (the PLANER paper, Latifi et al., 2022): what turns a converted model
(`PlanerClassifier.from_dense`) into one that meets a latency target.

`fit` (one verb, each step resumed from out_dir, so rerunning `convert` continues):
1. routers (routers.safetensors; stats and settings in routers.json, a `Stage`): every layer's router
   trained on the frozen dense model's FFN inputs (`train_routers`, teacher capture by forward hooks);
2. latency table (latency_table.json, `adaptinf.recipes.latency_table`): every candidate block timed
   on this machine at the deployment batch size and sequence length; re-profiled when taken elsewhere;
3. search (search.json, a `Stage`): greedy, from the dense architecture, the one-slot downgrade (to
   the next cheaper block of that slot) with the least proxy increase per millisecond saved, until
   the additive estimate meets (1 - search_margin) * target; then the best one-slot upgrades that
   still fit (`search`). Proxy: KL from the dense model's logits + relative error of the pooled
   representation on a few hundred validation samples. The result's latency is then measured
   (interleaved with the dense architecture); while it misses the target, the aim is tightened by the
   miss and the descent continues (up to 3 rounds, recorded in search.json; `_search_measured`).
   With `candidates` > 1 the same is done over widths only (no block skipped) and for the best
   uniform architecture (`search_candidates`): distinct architectures that the zero-shot proxy
   ranks poorly against each other (it favours dropping whole blocks, which distillation recovers
   worst). Skipped when the config names the architecture;
4. candidates (candidates.json, candidates/<key>-<i>/, a `Stage`): each candidate distilled for
   `candidate_steps` steps, scored by accuracy on the whole validation split (the trained proxy),
   the best kept with its weights (`_pick_candidate`);
5. router refit (refit_search.json / .safetensors): every router refitted on the student's own FFN
   inputs (`train_routers(on_student=True)`, `router_refit_samples` training samples);
6. distillation (finetune/): the shared trainer, task loss + distill_weight * KL to the dense logits
   + hidden_weight * the per-layer relative squared error to the dense model's hidden states (the
   model's forward adds both while training), continuing from the picked candidate's weights; then
   the routers refitted again (refit_final.json / .safetensors);
7. real latency of the result, measured interleaved with the dense architecture at the table's
   settings; a missed target is printed and recorded in the summary and architecture.json (the
   architecture also stays readable in the saved config), never hidden.

Training passes over the training split (what `adaptinf.preset.method_samples` must count):
router_epochs + candidates * candidate_steps * batch_size / n_train + the distillation's steps +
2 * min(router_refit_samples, n_train) / n_train (forward-only passes of the student).

Under torchrun, rank 0 does the routers, table and search (the others read its files, so every rank
has the same architecture), all ranks fine-tune, rank 0 measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptinf.checkpoint import save_tensors_atomic, write_json_atomic
from adaptinf.data import Encoded, eval_batches, steps_per_epoch, train_batches
from adaptinf.methods.planer import PlanerClassifier, PlanerConfig, parse_slot
from adaptinf.model import accuracy
from adaptinf.recipes import latency_table as latency
from adaptinf.recipes.finetune import Stage, barrier, capture_tokens, dist_info, finetune_then_load_best, load_best
from adaptinf.settings import TrainConfig

FILES = ("routers.safetensors", "routers.json", "latency_table.json", "search.json", "candidates.json",
         "refit_search.json", "refit_search.safetensors", "refit_final.json", "refit_final.safetensors",
         "architecture.json")


# --- the recipe -------------------------------------------------------------------------------------


def fit(model: PlanerClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out_dir: str | os.PathLike,
        progress: bool = True, restart: bool = False) -> dict:
    """Routers, latency table, search, distillation (finetune/), final latency measurement (see the
    module docstring); each step resumed from out_dir when rerun. Returns the summary (rank 0; {}
    on the other ranks)."""
    rank, _ = dist_info()
    c, out = model.config, Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES if restart else ():
            (out / name).unlink(missing_ok=True)
    summary: dict[str, Any] = {"n_train": len(train)}
    routers = _router_settings(c, train, cfg)
    summary.update(_routers(model, train, cfg, out, routers, rank, progress))
    table = _latency_table(model, out / "latency_table.json", rank)
    dense_ms = table.dense_ms(model.spec.encoder.num_hidden_layers)
    target_ms = c.latency_target_ms if c.latency_target_ms is not None else c.latency_target * dense_ms
    summary.update(latency_table=str(out / "latency_table.json"), latency_target_ms=target_ms, dense_estimated_ms=dense_ms)
    summary["search"] = _architecture(model, table, target_ms, val, cfg, out, routers, rank, progress)
    if isinstance(summary["search"], dict) and len(summary["search"].get("candidates", [])) > 1 and c.finetune:
        summary["candidates"] = _pick_candidate(model, summary["search"], train, val, cfg, out, rank, progress)
    estimated = table.estimate(model.architecture)
    if c.finetune:  # distillation from the dense model (the shared trainer, at knob None)
        summary["router_refit_search"] = _refit(model, train, cfg, out, "refit_search", rank, progress)
        result = finetune_then_load_best(model, train, val, cfg, out / "finetune", progress=progress, restart=restart)
        summary.update(best_val_score=result.best_val_score, best_epoch=result.best_epoch, steps=result.steps,
                       best_step=result.best_step, stopped_early=result.stopped_early)
        summary["router_refit_final"] = _refit(model, train, cfg, out, "refit_final", rank, progress)
    if rank != 0:
        return {}
    pad = model.spec.encoder.pad_token_id
    summary["val_accuracy"] = accuracy(model, val, cfg.eval_batch_size, pad)[0]
    if model._teacher:
        summary["val_accuracy_dense"] = accuracy(model._teacher[0], val, cfg.eval_batch_size, pad)[0]
    summary.update(_final_latency(model, table, estimated, target_ms, out))
    return summary


def _router_settings(c: PlanerConfig, train: Encoded, cfg: TrainConfig) -> dict:
    """What the trained routers depend on (the routers' `Stage` key, part of the search's)."""
    return {"num_experts": c.num_experts, "router_hidden": c.router_hidden, "kmeans_iters": c.kmeans_iters,
            "router_epochs": c.router_epochs, "router_lr": c.router_lr, "n_train": len(train),
            "batch_size": cfg.batch_size, "seed": cfg.seed}


def _routers(model: PlanerClassifier, train: Encoded, cfg: TrainConfig, out: Path, settings: dict, rank: int,
             progress: bool) -> dict:
    """Step 1: train the routers (rank 0) unless routers.json holds a result under these settings
    and the weights are there; every rank then loads the weights. Their stats and the time."""
    t0 = time.time()
    stage, weights = Stage(out, "routers", settings), out / "routers.safetensors"
    if rank == 0 and (stage.result() is None or not weights.is_file()):
        stats = train_routers(model, train, cfg, progress)
        save_tensors_atomic(dict(model.routers.state_dict()), weights)
        stage.finish(stats)
    barrier()
    model.routers.load_state_dict(load_file(str(weights)))
    return {"routers": stage.result(), "router_seconds": round(time.time() - t0, 1)}


def _latency_table(model: PlanerClassifier, path: Path, rank: int) -> latency.LatencyTable:
    """Step 2: the latency table at the deployment setting, profiled by rank 0 unless the stored one
    was taken under these very conditions."""
    c = model.config
    if rank == 0:
        table = latency.LatencyTable.load(path) if path.is_file() else None
        if (table is None or table.mismatches(c.latency_batch_size, c.latency_seq_len, model.latency_shape())
                or any(b not in table.blocks for b in model.block_choices() if not b.endswith(":skip"))):
            monotone_table(latency.profile(model, c.latency_batch_size, c.latency_seq_len, c.latency_repeats)).save(path)
    barrier()
    return latency.LatencyTable.load(path)


NARROWING = {"attn": ("full", "half", "quarter"), "ffn": ("dense", "3quarter", "half", "quarter")}


def monotone_table(table: latency.LatencyTable) -> latency.LatencyTable:
    """A static block that runs a subset of a wider one's heads or neurons is never timed above it:
    on a loaded machine single timings invert (a half FFN above the dense one), which would send the
    search's "next cheaper block" the wrong way. Each narrower block is capped at the wider one's
    time; the raw times are kept in `extra["raw_blocks"]`."""
    raw = dict(table.blocks)
    for kind, names in NARROWING.items():
        cap = None
        for n in names:
            key = f"{kind}:{n}"
            if key in table.blocks:
                cap = table.blocks[key] if cap is None else min(cap, table.blocks[key])
                table.blocks[key] = cap
    table.extra = {**table.extra, "raw_blocks": raw}
    return table


def _architecture(model: PlanerClassifier, table: latency.LatencyTable, target_ms: float, val: Encoded,
                  cfg: TrainConfig, out: Path, routers: dict, rank: int, progress: bool) -> dict | str:
    """Step 3: the searched architecture (rank 0 searches unless search.json holds a result for this
    aim, table, proxy and routers), set on the model and its config; the search record."""
    c = model.config
    if c.architecture:
        return "skipped: the config names the architecture"
    proxy = _subset(val, c.proxy_samples)
    aim = (1 - c.search_margin) * target_ms
    settings = {"aim_ms": aim, "table": table.created, "proxy_samples": len(proxy), "routers": routers,
                "candidates": c.candidates, "options": model.block_choices()}
    stage = Stage(out, "search", settings)
    if rank == 0 and stage.result() is None:
        stage.finish(search_candidates(model, table, aim, proxy, cfg, progress))
    barrier()
    found = stage.result()
    model.config.architecture = tuple(found["architecture"])
    model.set_architecture(found["architecture"])
    return found


VARIANTS = (  # the searches that propose candidates, in order: (name, the blocks they may use)
    ("greedy", None),
    ("widths", lambda b: not b.endswith(":skip")),  # no block skipped: every layer kept, narrowed
    ("ffn_kept", lambda b: b != "ffn:skip"),  # attention may be skipped, FFNs kept (the paper's finding)
    ("uniform", "uniform"),  # the same blocks in every layer
    ("attn_kept", lambda b: b != "attn:skip"),
)


def search_candidates(model: PlanerClassifier, table: latency.LatencyTable, aim: float, proxy: Encoded,
                      cfg: TrainConfig, progress: bool = False) -> dict:
    """Up to `candidates` distinct architectures under `aim`, each checked on measured latency
    (`_search_measured`), from the searches of `VARIANTS` in order: the greedy search over every
    block (the result when there is one candidate), then greedy searches over restricted blocks and
    the costliest uniform architecture that fits. Searches that cannot meet the aim are left out.
    Returns the first one's record with "candidates": every kept record."""
    c = model.config
    kept: list[dict] = []
    for name, only in VARIANTS:
        if len(kept) >= c.candidates:
            break
        found = _search_measured(model, table, aim, proxy, cfg, progress, only=only)
        if kept and not found["meets_target_estimate"]:
            continue
        if any(k["architecture"] == found["architecture"] for k in kept):
            continue
        kept.append({**found, "variant": name})
    return {**kept[0], "candidates": kept}


def _pick_candidate(model: PlanerClassifier, found: dict, train: Encoded, val: Encoded, cfg: TrainConfig, out: Path,
                    rank: int, progress: bool) -> dict:
    """The trained proxy: each candidate architecture distilled for `candidate_steps` steps from the
    converted weights (its own folder under candidates/, resumable), scored by validation accuracy
    (every validation sample); the best is kept with its distilled weights, set on the model and its
    config. The record: every candidate's architecture, estimate and score, and the pick."""
    c = model.config
    cands = found["candidates"]
    steps = c.candidate_steps
    ccfg = dataclasses.replace(cfg, epochs=1, min_steps=steps, max_steps=steps, eval_every=0, patience=0)
    key = {"candidates": [k["architecture"] for k in cands], "steps": steps, "n_train": len(train),
           "hidden_weight": c.hidden_weight, "distill_weight": c.distill_weight,
           "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("epochs", "min_steps", "max_steps",
                                                                                    "eval_every", "patience")}}
    stage = Stage(out, "candidates", key)
    tag = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if stage.result() is None:
        rows = []
        for i, k in enumerate(cands):
            model.load_state_dict(base)
            model.set_architecture(k["architecture"])
            result = finetune_then_load_best(model, train, val, ccfg, out / "candidates" / f"{tag}-{i}", progress=progress)
            rows.append({"variant": k.get("variant"), "architecture": k["architecture"],
                         "estimated_ms": k["estimated_ms"], "measured_vs_dense": k["rounds"][-1]["measured_vs_dense"],
                         "zero_shot_proxy": k["proxy"], "val_accuracy": result.best_val_score, "steps": result.steps})
            if progress:
                print(f"planer candidate {i} ({k.get('variant')}): {k['architecture']} -> val {result.best_val_score:.4f} "
                      f"after {result.steps} steps")
        barrier()
        picked = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -i))
        record = {"candidates": rows, "picked": picked}
        if rank == 0:
            stage.finish(record)
        barrier()
    record = stage.result()
    arch = record["candidates"][record["picked"]]["architecture"]
    model.load_state_dict(base)
    model.config.architecture = tuple(arch)
    model.set_architecture(arch)
    load_best(model, out / "candidates" / f"{tag}-{record['picked']}")
    return record


def _refit(model: PlanerClassifier, train: Encoded, cfg: TrainConfig, out: Path, name: str, rank: int,
           progress: bool) -> dict | None:
    """Refit every router on the student's own FFN inputs (its current architecture and weights) over
    `router_refit_samples` training samples (rank 0; a `Stage` with the weights in <name>.safetensors);
    None when router_refit_samples is 0 or the architecture has no MoE or dense FFN slot."""
    c = model.config
    if not c.router_refit_samples or not any(f in ("moe", "dense") for _, f, _ in model._arch):
        return None
    digest = hashlib.sha256(b"".join(t.detach().float().flatten()[:1024].numpy().tobytes()
                                     for t in model.state_dict().values())).hexdigest()[:16]
    stage = Stage(out, name, {"architecture": model.architecture, "samples": c.router_refit_samples,
                              "router_lr": c.router_lr, "weights": digest, "n_train": len(train), "seed": cfg.seed})
    weights = out / f"{name}.safetensors"
    if rank == 0 and (stage.result() is None or not weights.is_file()):
        stats = train_routers(model, _subset(train, c.router_refit_samples), cfg, progress, on_student=True)
        save_tensors_atomic(dict(model.routers.state_dict()), weights)
        stage.finish(stats)
    barrier()
    model.routers.load_state_dict(load_file(str(weights)))
    return stage.result()


def _final_latency(model: PlanerClassifier, table: latency.LatencyTable, estimated: float, target_ms: float,
                   out: Path) -> dict:
    """Step 5: real latency of the final model, the dense and the empty architecture, interleaved, with
    the table's settings. A relative target is checked against the dense model measured in the same
    run (drift cancels); a target in ms against the measured milliseconds. Written to
    architecture.json and printed, met or missed."""
    c, arch, layers = model.config, model.architecture, model.spec.encoder.num_hidden_layers
    check = latency.validate(model, table, [arch, ["full/dense"] * layers, ["skip/skip"] * layers],
                             repeats=2 * table.repeats)
    measured, dense_measured = check["rows"][0]["measured_ms"], check["rows"][1]["measured_ms"]
    if c.latency_target_ms is not None:
        met, goal = measured <= c.latency_target_ms, f"target {c.latency_target_ms:.2f} ms"
    else:
        met, goal = measured <= c.latency_target * dense_measured, f"target {c.latency_target:g} x dense"
    record = {"architecture": arch, "estimated_ms": estimated, "measured_ms": measured,
              "dense_measured_ms": dense_measured, "measured_vs_dense": measured / dense_measured,
              "latency_target": None if c.latency_target_ms is not None else c.latency_target,
              "latency_target_ms": target_ms, "latency_target_met": met,
              "batch_size": table.batch_size, "seq_len": table.seq_len, "torch_threads": table.torch_threads,
              "machine": table.machine}
    write_json_atomic(out / "architecture.json", record)
    print(f"planer: architecture {arch}; latency at batch {table.batch_size}, {table.seq_len} tokens, "
          f"{table.torch_threads} threads: estimated {estimated:.2f} ms, measured {measured:.2f} ms "
          f"({measured / dense_measured:.2f} x dense, measured {dense_measured:.2f} ms); {goal}: "
          + ("met" if met else "MISSED (measured latency above the target)"))
    return {**record, "latency_model_error": check}


def _subset(enc: Encoded, n: int) -> Encoded:
    """The first n samples of a seeded permutation (the proxy set of the search)."""
    if len(enc) <= n:
        return enc
    idx = torch.randperm(len(enc), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return Encoded([enc.ids[i] for i in idx], enc.labels[idx])


# --- routers ----------------------------------------------------------------------------------------


def train_routers(model: PlanerClassifier, train: Encoded, cfg: TrainConfig, progress: bool = False,
                  on_student: bool = False) -> dict:
    """Fit every layer's router to the norms of its experts' outputs (relative to the token's mean
    norm, `PlanerClassifier.expert_norms`) on FFN inputs, real tokens only: the dense model's,
    captured by forward hooks on the frozen teacher, or with `on_student` the model's own at its
    current architecture (eval mode, as at inference; layers whose FFN is skipped are left as they
    are), starting from the current routers. MSE, Adam, one optimizer per layer.

    Returns, per layer trained (last epoch): the MSE over the variance of the targets across experts
    ("unexplained_variance", 1 = no better than predicting every expert alike) and how often the
    router's top expert is the true top expert ("top1_agreement")."""
    c = model.config
    if not on_student and not model._teacher:
        raise ValueError("router training needs the dense model: build this model with PlanerClassifier.from_dense")
    layers = len(model.encoder.blocks)
    model.routers.requires_grad_(True)
    opts = [torch.optim.Adam(r.parameters(), lr=c.router_lr) for r in model.routers]
    sums = [[0.0, 0.0, 0.0, 0] for _ in range(layers)]
    epochs = 1 if on_student else c.router_epochs
    total = steps_per_epoch(len(train), cfg.batch_size) * epochs
    bar = tqdm(total=total, desc="planer routers" + (" (student)" if on_student else ""), disable=not progress, unit="step")
    was_training = model.training
    pad = model.spec.encoder.pad_token_id
    try:
        with contextlib.ExitStack() as stack:
            if not on_student:
                teacher = model._teacher[0]
                # the experts' input [T, d]: up's input, `FeedForward.inp` (after the LayerNorm in a pre-LN block)
                points = {str(i): (teacher.encoder.blocks[i].ffn.up, "input") for i in range(layers)}
                captured = stack.enter_context(capture_tokens(points))
            model.eval()
            for epoch in range(epochs):
                sums = [[0.0, 0.0, 0.0, 0] for _ in range(layers)]
                for batch, _, _ in train_batches(train, cfg.batch_size, cfg.seed, epoch, pad_id=pad):
                    with torch.no_grad():
                        if on_student:
                            inputs = _student_ffn_inputs(model, batch.input_ids, batch.attention_mask)
                        else:
                            captured.select(batch.attention_mask)
                            teacher(batch.input_ids, batch.attention_mask)
                            inputs = {i: captured[str(i)] for i in range(layers)}
                    for i, x in inputs.items():
                        router_step(model, i, x, opts[i], sums[i])
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
        model.routers.requires_grad_(False)
    return {str(i): {"unexplained_variance": s[0] / max(s[1], 1e-30), "top1_agreement": s[2] / max(s[3], 1)}
            for i, s in enumerate(sums) if s[3]}


def _student_ffn_inputs(model: PlanerClassifier, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """layer -> the model's own FFN inputs [T, d] on the real tokens, at its architecture (knob None)."""
    h, bias, ctx = model.prepare(input_ids, attention_mask, knob=None)
    ctx.ffn_inputs = {}
    for layer in range(len(model.encoder.blocks)):
        h = model.run_layer(layer, h, bias, ctx)
    return ctx.ffn_inputs


def router_step(model: PlanerClassifier, layer: int, x: torch.Tensor, opt: torch.optim.Optimizer, sums: list) -> None:
    """One Adam step of layer `layer`'s router on tokens x [T, d]; adds to sums (loss * T, target
    variance * T, top-1 hits, T)."""
    with torch.no_grad():
        # per token relative to its mean: top-k and the (1 - tau) * max threshold only compare a
        # token's experts with each other, and the scale is then ~1
        norms = model.expert_norms(layer, x)  # [T, E]
        target = norms / norms.mean(dim=1, keepdim=True).clamp_min(1e-12)
    pred = model.routers[layer](x)  # [T, E]
    loss = F.mse_loss(pred, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t = x.shape[0]
    sums[0] += float(loss.detach()) * t
    sums[1] += float(target.var(dim=1, unbiased=False).mean()) * t
    sums[2] += float((pred.detach().argmax(1) == target.argmax(1)).sum())
    sums[3] += t


# --- search -----------------------------------------------------------------------------------------


def _search_measured(model: PlanerClassifier, table: latency.LatencyTable, aim: float, proxy: Encoded,
                     cfg: TrainConfig, progress: bool, rounds: int = 3, only=None) -> dict:
    """Search under `aim` (ms, table estimate), then measure the result against the dense
    architecture (interleaved, the table's settings); while it misses the target, tighten the aim
    by the miss and continue the descent from it (at most `rounds` searches). Then one upgrade pass on
    the measured headroom (the result measured under (1 - search_margin) * target: aim at the
    estimate scaled by it, refine from the result; kept if it measures within the target). `only`: None (every
    block), a filter of block names, or "uniform" (`search_uniform`). The table's absolute
    times drift with the machine's load, so the target is checked as the measured ratio to dense
    (a relative target, so drift cancels) or as measured milliseconds (a target in ms)."""
    c, layers = model.config, model.spec.encoder.num_hidden_layers
    dense_est = table.dense_ms(layers)
    arch, rounds_log, found = None, [], {}

    def run(aim_ms: float, start: list[str] | None) -> tuple[dict, float]:
        if only == "uniform":
            got = search_uniform(model, table, aim_ms)
        else:
            got = search(model, table, aim_ms, proxy, cfg.eval_batch_size, progress, start=start, only=only)
        rows = latency.validate(model, table, [got["architecture"], ["full/dense"] * layers])["rows"]
        measured, dense = rows[0]["measured_ms"], rows[1]["measured_ms"]
        # > 1: the measured latency misses the target by this factor
        miss = measured / c.latency_target_ms if c.latency_target_ms is not None else measured / dense / c.latency_target
        rounds_log.append({"aim_ms": aim_ms, "architecture": got["architecture"], "estimated_ms": got["estimated_ms"],
                           "estimated_vs_dense": got["estimated_ms"] / dense_est, "measured_ms": measured,
                           "measured_vs_dense": measured / dense, "miss": miss})
        return got, miss

    ok = 1 - c.search_margin / 2  # accepted with half the margin as headroom: measurements on a shared machine vary
    for _ in range(rounds):
        found, miss = run(aim, arch)
        arch = found["architecture"]
        if miss <= ok or not found["meets_target_estimate"]:
            break
        aim *= (1 - c.search_margin) / miss
    # the upgrade pass on measured latency: when the result measures well under the target (the
    # additive estimate runs high, or the last descent step overshot), aim at the measured headroom
    # and take the upgrades that fit it; kept only if it still measures within the target
    if found["meets_target_estimate"] and miss < 1 - c.search_margin:
        up_aim = found["estimated_ms"] / miss * ok
        up, up_miss = run(up_aim, arch)
        rounds_log[-1]["step"] = "upgrade"
        if up["architecture"] != arch and up_miss <= ok and up["meets_target_estimate"]:
            found = up
    return {**found, "rounds": rounds_log}


@dataclass
class SearchPoint:
    """An architecture on the search's path, with its per-layer hidden states and proxy."""

    arch: list[str]
    states: list[list[torch.Tensor]]  # states[l][i]: layer l's input for proxy batch i ([layers]: the last)
    proxy: float


class _Proxy:
    """The search's proxy (lower is better, 0 for the dense model): mean KL(dense || candidate) of the
    logits plus the relative squared error of the pooled representation (informative even where the
    dense head is unsure), on fixed batches, at the searched top-k (knob None)."""

    def __init__(self, model: PlanerClassifier, proxy: Encoded, batch_size: int):
        self.model, self.layers = model, len(model.encoder.blocks)
        batches = eval_batches(proxy, batch_size, model.spec.encoder.pad_token_id)
        self.prepared = [model.prepare(b.input_ids, b.attention_mask, knob=None) for b in batches]
        dense = ["full/dense"] * self.layers
        self.dense = SearchPoint(dense, self.states(dense, 0, [[p[0] for p in self.prepared]]), 0.0)
        self.ref = self.heads(self.dense.states[-1])
        self.ref_power = max(sum(float(p.pow(2).sum()) for p, _ in self.ref), 1e-30)

    def states(self, arch: list[str], start: int, cache: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """The per-layer states of `arch`, reusing `cache` (another architecture's) up to layer `start`:
        a candidate changing layer l reruns only layers l.. ."""
        out = [list(c) for c in cache[: start + 1]] + [[] for _ in range(start, self.layers)]
        for i, (_, bias, ctx) in enumerate(self.prepared):
            h = out[start][i]
            for l in range(start, self.layers):
                h = self.model.run_layer(l, h, bias, ctx, parse_slot(arch[l], self.model.config.num_experts))
                out[l + 1].append(h)
        return out

    def heads(self, last: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pooled = [self.model.encoder.pool(h) for h in last]  # [b, d] each
        return [(p, F.log_softmax(self.model.classifier(p), -1)) for p in pooled]

    def score(self, last: list[torch.Tensor]) -> float:
        kl, err, n = 0.0, 0.0, 0
        for (p, logp), (rp, rlogp) in zip(self.heads(last), self.ref):
            kl += float(F.kl_div(logp, rlogp, log_target=True, reduction="sum"))
            err += float((p - rp).pow(2).sum())
            n += p.shape[0]
        return kl / max(n, 1) + err / self.ref_power

    def point(self, arch: list[str], start: int, base: SearchPoint) -> SearchPoint:
        """`arch` evaluated from `base`'s states (which agree with it below layer `start`)."""
        states = self.states(arch, start, base.states)
        return SearchPoint(arch, states, self.score(states[-1]))


def block_options(model: PlanerClassifier, table: latency.LatencyTable, only=None) -> dict[str, list[str]]:
    """The blocks a search may choose per slot kind: the model's choices that the table has (skips
    always), filtered by `only` (a predicate on block names) when given."""
    names = [n for n in model.block_choices() if (n.endswith(":skip") or n in table.blocks) and (only is None or only(n))]
    return {kind: [n for n in names if n.startswith(kind + ":")] for kind in ("attn", "ffn")}


def search_uniform(model: PlanerClassifier, table: latency.LatencyTable, target_ms: float) -> dict:
    """The uniform architecture (the same attention and FFN block in every layer, neither skipped) with
    the highest estimate that meets `target_ms`; the cheapest one when none does. No proxy."""
    options = block_options(model, table, lambda b: not b.endswith(":skip"))
    layers = model.spec.encoder.num_hidden_layers
    archs = [[f"{a.split(':')[1]}/{f.split(':')[1]}"] * layers for a in options["attn"] for f in options["ffn"]]
    fits = [a for a in archs if table.estimate(a) <= target_ms]
    arch = max(fits, key=table.estimate) if fits else min(archs, key=table.estimate)
    est = table.estimate(arch)
    return {"architecture": arch, "estimated_ms": est, "proxy": None, "meets_target_estimate": est <= target_ms,
            "path": []}


def _with_slot(arch: list[str], layer: int, block: str) -> list[str]:
    """`arch` with one slot of `layer` replaced by `block` ("attn:half", "ffn:moe2", ...)."""
    a, f = arch[layer].split("/")
    kind, choice = block.split(":")
    cand = list(arch)
    cand[layer] = f"{choice}/{f}" if kind == "attn" else f"{a}/{choice}"
    return cand


def _slot_of(arch: list[str], layer: int, kind: str) -> str:
    return f"{kind}:{arch[layer].split('/')[0 if kind == 'attn' else 1]}"


def _moves(arch: list[str], table: latency.LatencyTable, options: dict[str, list[str]],
           downgrade: bool) -> Iterator[tuple[int, list[str]]]:
    """One-slot changes of `arch`, layer by layer, attention then FFN: (layer, candidate). Downgrade:
    each slot to the next cheaper block (by the table); else each slot to every dearer block."""
    for l in range(len(arch)):
        for kind, opts in options.items():
            now = table.block_ms(_slot_of(arch, l, kind))
            if downgrade:
                cheaper = [o for o in opts if table.block_ms(o) < now]
                if cheaper:
                    yield l, _with_slot(arch, l, max(cheaper, key=table.block_ms))
            else:
                yield from ((l, _with_slot(arch, l, o)) for o in opts if table.block_ms(o) > now)


def descend(ev: _Proxy, cur: SearchPoint, table, target_ms: float, options: dict, bar, path: list) -> SearchPoint:
    """While the estimate misses the target: the downgrade with the least proxy increase per ms saved."""
    est = table.estimate(cur.arch)
    while est > target_ms:
        best = None
        for l, cand in _moves(cur.arch, table, options, downgrade=True):
            new = ev.point(cand, l, cur)
            ratio = (new.proxy - cur.proxy) / (est - table.estimate(cand))
            if best is None or ratio < best[0]:
                best = (ratio, new)
            bar.update(1)
        if best is None:
            break  # nothing cheaper left: the target cannot be met with these blocks
        cur = best[1]
        est = table.estimate(cur.arch)
        path.append({"step": "downgrade", "architecture": list(cur.arch), "estimated_ms": est, "proxy": cur.proxy})
    return cur


def refine_search(ev: _Proxy, cur: SearchPoint, table, target_ms: float, options: dict, bar, path: list) -> SearchPoint:
    """While the estimate meets the target: the upgrade that still fits it and lowers the proxy most."""
    est = table.estimate(cur.arch)
    while est <= target_ms:
        best = None
        for l, cand in _moves(cur.arch, table, options, downgrade=False):
            if table.estimate(cand) > target_ms:
                continue
            new = ev.point(cand, l, cur)
            if new.proxy < cur.proxy and (best is None or new.proxy < best.proxy):
                best = new
            bar.update(1)
        if best is None:
            break
        cur = best
        est = table.estimate(cur.arch)
        path.append({"step": "upgrade", "architecture": list(cur.arch), "estimated_ms": est, "proxy": cur.proxy})
    return cur


@torch.no_grad()
def search(model: PlanerClassifier, table: latency.LatencyTable, target_ms: float, proxy: Encoded,
           batch_size: int = 64, progress: bool = False, start: list[str] | None = None, only=None) -> dict:
    """Greedy search under `target_ms` (the table's additive estimate), from the dense architecture.

    Descent: repeatedly take the one-slot downgrade (to the next cheaper block of that slot, by the
    table) with the least proxy increase per millisecond saved, until the estimate meets the
    target. Refinement: the last step usually overshoots, so while some one-slot upgrade (to any
    dearer block) still fits the target and lowers the proxy, take the best one. Proxy: `_Proxy`, on
    `proxy`. `start` continues the descent from that architecture instead of the dense one. The
    blocks are the model's `block_choices()` (those the table has, and that `only` keeps when given).
    The model's architecture, knob and mode are left as they are. Returns the architecture and the path.
    """
    was_training = model.training
    model.eval()
    options = block_options(model, table, only)
    bar = tqdm(desc="planer search", disable=not progress, unit="candidate")
    path: list[dict] = []
    try:
        ev = _Proxy(model, proxy, batch_size)
        cur = ev.dense
        if start is not None and list(start) != cur.arch:
            cur = ev.point(list(start), 0, cur)
        cur = descend(ev, cur, table, target_ms, options, bar, path)
        cur = refine_search(ev, cur, table, target_ms, options, bar, path)
    finally:
        bar.close()
        model.train(was_training)
    est = table.estimate(cur.arch)
    return {"architecture": cur.arch, "estimated_ms": est, "proxy": cur.proxy, "meets_target_estimate": est <= target_ms,
            "path": path}
