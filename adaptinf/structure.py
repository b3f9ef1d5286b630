"""Each method's structure fitted to the backbone it converts: `adapt(method, sets, encoder)`.

A preset (or `adaptinf convert --set`) may name structure written for one backbone, such as the exits
2, 4, 6 of the 6-layer MiniLM. `adapt` returns the method's config fields (a preset's `set:`
mapping) with every shape-dependent field that the given encoder cannot hold replaced by the
closest one it can, and one note per change. A field that fits is returned as given, so on the
backbone a preset was written for its settings come back unchanged, with no notes. A field left out
keeps the method's own default, itself derived from the shape (early-exit exits: "auto", every
layer for ee and multi-model, the paper's placement scaled to depth for sweet;
SHARCS router layer: a third of the layers), unless that default cannot fit (then it is set, noted).
Only when no valid structure exists for the shape is it refused: ValueError, one line.

Rules (L layers, H heads, d hidden size, d_ff intermediate size):
- ee, sweet, multi-model, `exits`: a placement by depth ("auto", "every", "paper": SWEET's exits
  1, 4, 6, 12 of 12 as fractions of L, `early_exit.paper_exits`) goes through unchanged: the model
  derives its layers from L itself (L=6: 1, 2, 3, 6). Named layers: those above L are dropped and L
  is added when it is not the last one (every sample needs the last exit); a preset records no
  depth of its own, so named exits are not rescaled: they keep the layers they name, as far as the
  model has them (name "paper" to scale with depth).
- sharcs: at least 2 layers and 2 heads. `router_layer` above L - 1 becomes L - 1 (the deepest
  router that leaves an adaptive layer). Widths that keep the same number of heads on this model
  (a width keeps max(1, round(w * H)) heads, `sharcs.width_shapes`) are merged into the largest of
  them, their confidence intervals into one spanning them all; when fewer than two widths remain,
  the default widths are merged the same way.
- acm: `learners` must leave no learner empty: each FFN learner holds ceil(d_ff / N) neurons, so
  (N - 1) * ceil(d_ff / N) < d_ff (groups need not divide d_ff: they are padded with zero neurons);
  with "attn" targets also N <= d (one singular component per learner at least). Otherwise the
  nearest valid count in 2..16 (the smaller on a tie).
- planer: `num_experts` must divide d_ff (equal-size experts) into experts of a multiple of 4
  neurons (`EXPERT_ALIGN`: rows of 16 bytes in float32, what `torch._grouped_mm` in PLANER's
  inference needs); otherwise the nearest such count in 2..64 (the smaller on a tie; where no
  divisor gives such experts, the nearest divisor), and an `architecture`'s moe<k> above it
  becomes moe<E>. A named
  architecture with another number of layers than L is dropped (the recipe searches one under the
  latency target instead); `latency_seq_len` above the model's positions becomes that maximum (a
  vision encoder: any other value than 1 + P, the length of every image, becomes 1 + P).
  Latency targets stay.

Notes read "<method>: <field> <old> -> <new> (<why>)", e.g.
"multi-model: exits [2, 4, 6] -> [2, 4] (the model has 4 layers)".
"""

from __future__ import annotations

from adaptinf.backbone import EncoderConfig
from adaptinf.methods import acm, planer, sharcs
from adaptinf.methods.early_exit import EarlyExitConfig

EARLY_EXIT = ("ee", "sweet", "multi-model")
# PLANER's inference runs the experts with torch._grouped_mm, whose operands' rows must be 16-byte
# multiples: an expert's neurons a multiple of 4 in float32
EXPERT_ALIGN = 4


def _plain(value):
    """A config value as a preset writes it: tuples as lists (nested too)."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _change(method: str, out: dict, notes: list[str], name: str, old, new, why: str) -> None:
    out[name] = _plain(new)
    notes.append(f"{method}: {name} {_plain(old)} -> {_plain(new)} ({why})")


def _nearest(want: int, candidates: list[int]) -> int | None:
    """The candidate closest to `want`, the smaller one on a tie; None when there is none."""
    return min(candidates, key=lambda c: (abs(c - want), c), default=None)


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


# --- early exit -----------------------------------------------------------------------------------


def _early_exit(method: str, sets: dict, enc: EncoderConfig, out: dict, notes: list[str]) -> None:
    exits = EarlyExitConfig.from_dict(sets).exits
    layers = enc.num_hidden_layers
    if not exits or isinstance(exits, str):  # every layer, "paper" or "auto": derived from the depth by the model
        return
    kept = [e for e in exits if e <= layers]
    if not kept or kept[-1] != layers:
        kept.append(layers)
    if tuple(kept) != exits:
        why = (f"the model has {_layers(layers)}" if exits[-1] > layers
               else f"the model has {_layers(layers)}; the last exit must be the last layer")
        _change(method, out, notes, "exits", exits, kept, why)


# --- SHARCS ---------------------------------------------------------------------------------------


def _merge_widths(widths, intervals, enc: EncoderConfig) -> tuple[list[float], list[list[float]], list[str]]:
    """Widths that keep the same heads on `enc` merged into the largest of them (intervals: their
    span), and a phrase per merged group ("0.25 and 0.5 both keep 1 head")."""
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(widths):
        groups.setdefault(sharcs.width_shapes(enc, (w,), True)[0].heads, []).append(i)
    merged_w = [widths[g[-1]] for g in groups.values()]
    merged_i = [[min(intervals[i][0] for i in g), max(intervals[i][1] for i in g)] for g in groups.values()]
    said = [f"{', '.join(str(widths[i]) for i in g[:-1])} and {widths[g[-1]]} {'both' if len(g) == 2 else 'all'} "
            f"keep {h} head{'s' if h > 1 else ''}" for h, g in groups.items() if len(g) > 1]
    return merged_w, merged_i, said


def _sharcs(method: str, sets: dict, enc: EncoderConfig, out: dict, notes: list[str]) -> None:
    layers, heads = enc.num_hidden_layers, enc.num_attention_heads
    if layers < 2:
        raise ValueError(f"sharcs: needs at least 2 layers (full-width ones before the router, adaptive ones after); "
                         f"the model has {_layers(layers)}")
    if heads < 2:
        raise ValueError("sharcs: needs at least 2 attention heads (its widths keep different numbers of heads); "
                         "the model has 1")
    cfg = sharcs.SharcsConfig.from_dict(sets)
    if cfg.router_layer is not None and cfg.router_layer > layers - 1:
        _change(method, out, notes, "router_layer", cfg.router_layer, layers - 1,
                f"the model has {_layers(layers)}; the router must leave at least one layer after it")
    widths, intervals, said = _merge_widths(cfg.widths, cfg.confidence_intervals, enc)
    if len(widths) < 2:  # every width keeps every head: the default widths, merged the same way
        default = sharcs.SharcsConfig()
        widths, intervals, _ = _merge_widths(default.widths, default.confidence_intervals, enc)
    if tuple(widths) != cfg.widths:
        why = f"with {heads} attention heads, {'; '.join(said)}"
        _change(method, out, notes, "widths", cfg.widths, widths, why)
        _change(method, out, notes, "confidence_intervals", cfg.confidence_intervals, intervals,
                "one per width: the merged widths' intervals joined")


# --- ACM ------------------------------------------------------------------------------------------


def _acm_misfit(n: int, enc: EncoderConfig, targets: tuple[str, ...]) -> str:
    """Why n learners per module would leave one of them empty on `enc` (see the module doc); "" if none."""
    width = acm.ffn_width(enc, n)
    if "ffn" in targets and (n - 1) * width >= enc.intermediate_size:
        return (f"{n} learners of ceil({enc.intermediate_size} / {n}) = {width} neurons leave the last one "
                f"empty: intermediate_size is {enc.intermediate_size}")
    if "attn" in targets and n * acm.attn_width(enc, n) > enc.hidden_size:
        return f"an attention projection of hidden_size {enc.hidden_size} has fewer components than {n} learners"
    return ""


def _acm(method: str, sets: dict, enc: EncoderConfig, out: dict, notes: list[str]) -> None:
    cfg = acm.AcmConfig.from_dict(sets)
    why = _acm_misfit(cfg.learners, enc, cfg.targets)
    if not why:
        return
    n = _nearest(cfg.learners, [k for k in range(2, 17) if not _acm_misfit(k, enc, cfg.targets)])
    if n is None:
        raise ValueError(f"acm: no learner count from 2 to 16 gives every learner a share of this model's modules "
                         f"(intermediate_size {enc.intermediate_size}, hidden_size {enc.hidden_size})")
    _change(method, out, notes, "learners", cfg.learners, n, why)


# --- PLANER ---------------------------------------------------------------------------------------


def _planer_architecture(method: str, cfg, experts: int, enc: EncoderConfig, out: dict, notes: list[str]) -> None:
    arch = list(cfg.architecture)
    if not arch:
        return
    if len(arch) != enc.num_hidden_layers:
        out.pop("architecture", None)
        notes.append(f"{method}: architecture of {_layers(len(arch))} dropped (the model has "
                     f"{_layers(enc.num_hidden_layers)}; one is searched under the latency target instead)")
        return
    fitted = []
    for slot in arch:
        a, f, k = planer.parse_slot(slot, cfg.num_experts)
        fitted.append(f"{a}/moe{min(k, experts)}" if f == "moe" else slot)
    if fitted != arch:
        _change(method, out, notes, "architecture", arch, fitted, f"at most {experts} experts per token")


def _planer(method: str, sets: dict, enc: EncoderConfig, out: dict, notes: list[str]) -> None:
    cfg = planer.PlanerConfig.from_dict(sets)
    d_ff, experts = enc.intermediate_size, cfg.num_experts
    divisors = [e for e in range(2, 65) if d_ff % e == 0]
    if not divisors:
        raise ValueError(f"planer: intermediate_size {d_ff} has no divisor from 2 to 64 to split it into "
                         "equal-size experts")
    aligned = [e for e in divisors if (d_ff // e) % EXPERT_ALIGN == 0]
    if experts not in (aligned or divisors):
        experts = _nearest(experts, aligned or divisors)
        why = (f"experts must divide intermediate_size {d_ff}" if d_ff % cfg.num_experts
               else f"an expert of {d_ff // cfg.num_experts} neurons is no multiple of {EXPERT_ALIGN}")
        _change(method, out, notes, "num_experts", cfg.num_experts, experts,
                why + ("" if aligned else f"; no divisor gives experts of a multiple of {EXPERT_ALIGN} neurons"))
    _planer_architecture(method, cfg, experts, enc, out, notes)
    if enc.is_vision and cfg.latency_seq_len != enc.max_positions:  # every image is 1 + P tokens long
        _change(method, out, notes, "latency_seq_len", cfg.latency_seq_len, enc.max_positions,
                f"every image is {enc.max_positions} tokens long (1 + {enc.num_patches} patches)")
    elif cfg.latency_seq_len > enc.max_positions:
        _change(method, out, notes, "latency_seq_len", cfg.latency_seq_len, enc.max_positions,
                f"the model has {enc.max_positions} positions")


_RULES = {**{m: _early_exit for m in EARLY_EXIT}, "sharcs": _sharcs, "acm": _acm, "planer": _planer}


def adapt(method: str, sets: dict, encoder: EncoderConfig) -> tuple[dict, list[str]]:
    """`method`'s config fields `sets` (a preset's `set:` mapping) fitted to `encoder`'s shape, and
    a note per field changed (see the module doc). A method without shape-dependent structure (the
    dense baseline, or one this module does not know) comes back as given. ValueError (one line)
    when no structure of the method fits the shape; `sets` invalid in itself raises the config's error."""
    given = dict(sets or {})
    out, notes = dict(given), []
    rule = _RULES.get(method)
    if rule is not None:
        rule(method, given, encoder, out, notes)
    return out, notes
