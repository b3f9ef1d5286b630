"""The language model end to end (adaptinf/lm.py, adaptinf/recipes/lm.py, `adaptinf train-lm` / `generate`):
training lowers the loss, an interrupted run resumes to the same weights, save/load keeps the logits,
perplexity is exp(mean NLL) computed by hand, generation is reproducible, bad input is one clear error,
and the decoder's FLOPs follow the convention. Tiny shapes: a few KB of text, a 300-token tokenizer, a
decoder of hidden 32."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adaptinf import flops
from adaptinf.cli import build_parser, main
from adaptinf.corpus import LMData, text_file_corpus, train_tokenizer
from adaptinf.decoder import DecoderConfig
from adaptinf.lm import (BUILTIN_LMS, LM_KIND, LanguageModel, builtin_lm_config, evaluate_perplexity, load_lm,
                         read_lm_config)
from adaptinf.recipes.lm import LMTrainConfig, build_lm, lm_lr_at, train_lm
from lm_text import random_text

QUIET = ["--no-progress", "--threads", "1"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=48)
TINY_SETS = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]



@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "novel.txt"
    path.write_text(random_text())
    assert 3_000 < path.stat().st_size < 10_000
    return path


@pytest.fixture(scope="module")
def data(text_file):
    corpus = text_file_corpus(text_file)
    tok = train_tokenizer(corpus.texts("train"), vocab_size=300)
    return tok, LMData.from_corpus(corpus, tok)


def _model(tok, seed: int = 0, dropout: float = 0.0, seq_len: int = 16) -> LanguageModel:
    model = build_lm(tok, "gpt-tiny", dropout=dropout, seed=seed, overrides=TINY)
    model.seq_len = seq_len
    return model


def _cfg(**kw) -> LMTrainConfig:
    base = dict(batch_size=4, seq_len=16, lr=3e-3, eval_every=4, save_every=3, eval_batch_size=8, log_every=2)
    return LMTrainConfig(**{**base, **kw})


# --- training ---------------------------------------------------------------------------------------------


def test_training_a_few_steps_lowers_the_loss(data, tmp_path):
    tok, d = data
    model = _model(tok)
    before = evaluate_perplexity(model, d.validation, seq_len=16)
    assert abs(before.loss - math.log(len(tok))) < 0.5  # an untrained model is near uniform
    res = train_lm(model, d, _cfg(max_steps=30, eval_every=10), tmp_path / "run", progress=False)
    assert res.steps == 30 and res.best_step > 0
    assert res.best_val_loss < before.loss - 0.5
    best = load_lm(tmp_path / "run" / "best")
    assert evaluate_perplexity(best, d.validation).loss == pytest.approx(res.best_val_loss, rel=1e-6)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss,val_loss,val_perplexity")


def test_an_interrupted_run_resumes_to_the_same_weights(data, tmp_path):
    """Stopped after 5 steps and resumed by a fresh model object: the same final weights, best model and
    metrics as one uninterrupted run (dropout on, so the RNG is restored too; the run crosses epochs)."""
    tok, d = data
    cfg = _cfg(epochs=20, max_steps=20, batch_size=8, dropout=0.1)  # 16 steps per epoch
    full = train_lm(_model(tok, dropout=0.1), d, cfg, tmp_path / "full", progress=False)
    part = train_lm(_model(tok, dropout=0.1), d, cfg, tmp_path / "part", progress=False, stop_after_steps=5)
    assert part.steps == 5
    again = train_lm(_model(tok, seed=7, dropout=0.1), d, cfg, tmp_path / "part", progress=False)  # weights come from last/
    assert again.resumed_from_step == 5 and again.steps == 20 == full.steps and again.epochs_run == 1
    for sub in ("last", "best"):
        wa, wb = load_file(str(tmp_path / "full" / sub / "model.safetensors")), load_file(str(tmp_path / "part" / sub / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    assert again.best_val_loss == full.best_val_loss and again.best_step == full.best_step


def test_a_resume_with_other_settings_is_refused(data, tmp_path):
    tok, d = data
    train_lm(_model(tok), d, _cfg(max_steps=3), tmp_path, progress=False, stop_after_steps=2)
    with pytest.raises(ValueError, match=r"other settings \(differs in \['train.lr'\]\)"):
        train_lm(_model(tok), d, _cfg(max_steps=3, lr=1e-2), tmp_path, progress=False)
    assert train_lm(_model(tok), d, _cfg(max_steps=3, lr=1e-2), tmp_path, progress=False, restart=True).steps == 3


def test_the_schedule_warms_up_then_decays_to_zero():
    for schedule in ("cosine", "linear"):
        cfg = LMTrainConfig(lr=1.0, warmup_ratio=0.1, schedule=schedule)
        lrs = [lm_lr_at(s, 100, cfg) for s in range(100)]
        assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) in (9, 10)
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.03
    cos = LMTrainConfig(lr=1.0, warmup_ratio=0.1)
    assert lm_lr_at(55, 100, cos) == pytest.approx(0.5)  # half-way through the decay


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("lr", 0.0), ("schedule", "step"), ("dropout", 1.0),
                                         ("seq_len", 1), ("warmup_ratio", 1.0)])
def test_train_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"LMTrainConfig.{field}"):
        LMTrainConfig(**{field: value})


# --- the model: save, load, perplexity, generation ----------------------------------------------------------


def test_save_load_round_trip_gives_identical_logits(data, tmp_path):
    tok, d = data
    model = _model(tok, seed=3).eval()
    model.save(tmp_path / "m", extra={"note": "x"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "adaptinf" and cfg["format_version"] == 1 and cfg["kind"] == LM_KIND
    assert cfg["method"] == "dense" and cfg["lm"] == {"name": "gpt-tiny", "seq_len": 16}
    assert DecoderConfig.from_dict(cfg["decoder"]) == model.cfg and cfg["extra"] == {"note": "x"}
    back = load_lm(tmp_path / "m")
    assert not back.training and back.seq_len == 16 and len(back.tokenizer) == len(tok)
    ids = d.test[:40].long().view(2, 20)
    assert torch.equal(back(ids).logits, model(ids).logits)
    text = "The lady said: 'walk to the garden', zebra!"
    assert back.tokenizer.encode(text) == tok.encode(text)


def test_perplexity_is_exp_of_the_mean_nll_computed_by_hand(data):
    tok, d = data
    model = _model(tok, seed=1).eval()
    stream, seq = d.validation.long(), 12
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, stream.numel() - 1, seq):  # non-overlapping windows, the last one shorter
            window = stream[start : start + seq + 1]
            logp = F.log_softmax(model.decoder(window[None, :-1]).logits[0].double(), dim=-1)
            nll -= logp.gather(1, window[1:, None]).sum().item()
            n += window.numel() - 1
    assert n == stream.numel() - 1
    for batch_size in (1, 3, 64):
        score = evaluate_perplexity(model, stream, batch_size=batch_size, seq_len=seq)
        assert score.tokens == n
        assert score.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    head = evaluate_perplexity(model, stream, seq_len=seq, max_tokens=30)
    assert head.tokens == 30


def test_generate_text_is_reproducible_and_stays_in_the_context(data):
    tok, _ = data
    model = _model(tok, seed=2).eval()
    a = model.generate_text("The lady", 10, seed=5, top_k=20, temperature=0.8)
    assert a == model.generate_text("The lady", 10, seed=5, top_k=20, temperature=0.8)
    assert a.text.startswith("The lady") and (a.new_tokens == 10 or a.stopped_at_eos)
    assert model.generate_text("The lady", 10, greedy=True) == model.generate_text("The lady", 10, greedy=True)
    n_prompt = model.encode_prompt("the lady " * 10).shape[1]
    g = model.generate_text("the lady " * 10, 128, greedy=True)
    assert g.cut_by_context and g.new_tokens <= model.cfg.max_positions - n_prompt
    with pytest.raises(ValueError, match="shorten the prompt"):
        model.generate_text("the lady " * 40, 5)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate_text("", 5)


# --- the commands ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dir(text_file, tmp_path_factory):
    """`adaptinf train-lm` on the text file with a tiny decoder: its output folder."""
    out = tmp_path_factory.mktemp("train-lm")
    assert main(["train-lm", "--task", str(text_file), "--vocab-size", "300", *TINY_SETS, "--max-steps", "6",
                 "--epochs", "5", "--batch-size", "4", "--seq-len", "16", "--eval-every", "3", "--lr", "3e-3", *QUIET,
                 "--out", str(out)]) == 0
    return out


def test_train_lm_command_writes_a_usable_model(trained_dir, text_file):
    summary = json.loads((trained_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["model"] == "gpt-tiny" and summary["seq_len"] == 16
    assert summary["resumed_from_step"] == 0
    assert summary["decoder"]["hidden_size"] == 32 and summary["decoder"]["vocab_size"] <= 300
    assert summary["best_val_perplexity"] > 1 and summary["test_perplexity"] > 1 and summary["test_tokens"] > 0
    model = load_lm(trained_dir / "best")
    assert model.cfg.eos_token_id == 0 and model.tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    extra = json.loads((trained_dir / "best" / "config.json").read_text())["extra"]
    assert extra["task"]["data"] == str(text_file) and extra["step"] in (3, 6)


def test_train_lm_command_resumes_and_refuses_other_settings(trained_dir, text_file, tmp_path, capsys):
    out = _copy(trained_dir, tmp_path / "run")
    args = ["train-lm", "--task", str(text_file), "--vocab-size", "300", *TINY_SETS, "--max-steps", "6", "--epochs", "5",
            "--batch-size", "4", "--seq-len", "16", "--eval-every", "3", "--lr", "3e-3", *QUIET, "--out", str(out)]
    assert main(args) == 0  # finished: nothing left to train, the summary is rewritten
    again = json.loads((out / "summary.json").read_text())
    assert again["resumed_from_step"] == 6 and again["steps"] == 6
    capsys.readouterr()
    assert main([*args, "--vocab-size", "280"]) == 2
    assert "other settings" in _one_error(capsys)


def test_generate_command_prints_text_reproducibly(trained_dir, capsys):
    best = str(trained_dir / "best")
    outs = []
    for seed in ("1", "1", "2"):
        assert main(["generate", best, "--prompt", "The lady", "--max-new-tokens", "12", "--seed", seed,
                     "--top-k", "50", *QUIET]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("The lady") and len(outs[0].strip()) > len("The lady")
    assert outs[2] != outs[0]
    assert main(["generate", best, "--prompt", "The lady", "--greedy", "--max-new-tokens", "5", *QUIET]) == 0
    assert capsys.readouterr().out.startswith("The lady")
    # the installed command, in a fresh process, prints the same text for the same seed
    done = subprocess.run([sys.executable, "-m", "adaptinf.cli", "generate", best, "--prompt", "The lady",
                           "--max-new-tokens", "12", "--seed", "1", "--top-k", "50", *QUIET],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == outs[0], done.stderr


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_generate_errors_are_one_clear_line(trained_dir, tmp_path, tiny_dense, capsys):
    from adaptinf.checkpoint import save_model

    best = trained_dir / "best"
    gen = lambda d, *rest: main(["generate", str(d), "--prompt", "The lady", *rest, *QUIET])  # noqa: E731
    assert gen(tmp_path / "nope") == 2 and "does not exist" in _one_error(capsys)
    save_model(tiny_dense, tmp_path / "clf")
    assert gen(tmp_path / "clf") == 2 and "classifier, not a language model" in _one_error(capsys)
    assert main(["generate", str(best), "--prompt", "", *QUIET]) == 2 and "--prompt is empty" in _one_error(capsys)
    long = " ".join(["the lady said"] * 40)
    assert main(["generate", str(best), "--prompt", long, *QUIET]) == 2 and "shorten the prompt" in _one_error(capsys)
    assert gen(best, "--greedy", "--temperature", "0.5") == 2 and "--greedy" in _one_error(capsys)
    assert gen(best, "--temperature", "0") == 2 and "--temperature" in _one_error(capsys)
    assert gen(best, "--max-new-tokens", "0") == 2 and "--max-new-tokens" in _one_error(capsys)

    bad = _copy(best, tmp_path / "bad-json")
    (bad / "config.json").write_text("{not json")
    assert gen(bad) == 2 and "corrupt" in _one_error(capsys)
    cfg = json.loads((best / "config.json").read_text())
    for name, change in (("no-decoder", lambda c: c.pop("decoder")),
                         ("bad-field", lambda c: c["decoder"].update(hidden_size=0)),
                         ("unknown-field", lambda c: c["decoder"].update(n_embd=3)),
                         ("other-shape", lambda c: c["decoder"].update(intermediate_size=96)),
                         ("more-layers", lambda c: c["decoder"].update(num_hidden_layers=3)),
                         ("classifier-kind", lambda c: c.update(kind="classifier")),
                         ("version", lambda c: c.update(format_version=99))):
        d = _copy(best, tmp_path / name)
        c = json.loads(json.dumps(cfg))
        change(c)
        (d / "config.json").write_text(json.dumps(c))
        msg = _one_error(capsys) if gen(d) == 2 else pytest.fail(name)
        expected = {"version": "format version 99", "other-shape": "the config implies (32, 96)",
                    "more-layers": "does not match"}.get(name, "corrupt")
        assert expected in msg, (name, msg)
    d = _copy(best, tmp_path / "no-weights")
    (d / "model.safetensors").unlink()
    assert gen(d) == 2 and "model.safetensors not found" in _one_error(capsys)


def test_lm_tasks_and_bad_model_settings_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["finetune", "--task", "austen", "--out", str(out), *QUIET]) == 2
    assert "train-lm --task austen" in _one_error(capsys)
    (tmp_path / "book.txt").write_text("Some text.\n")
    assert main(["finetune", "--task", str(tmp_path / "book.txt"), "--out", str(out), *QUIET]) == 2
    assert "a plain text file is a language-modelling corpus" in _one_error(capsys)
    assert main(["run", "--task", str(tmp_path / "book.txt"), "--out", str(tmp_path / "r"), *QUIET]) == 2  # LM run: too short
    err = capsys.readouterr().err  # the run's header line, then one error line
    assert "error: " in err and "too short to split" in err and "Traceback" not in err
    assert main(["train-lm", "--set", "hidden_size=30", "--set", "num_attention_heads=4", "--out", str(out), *QUIET]) == 2
    assert "divisible by num_attention_heads" in _one_error(capsys)
    assert main(["train-lm", "--seq-len", "512", "--out", str(out), *QUIET]) == 2
    assert "--seq-len 512 exceeds the model's context of 256" in _one_error(capsys)
    assert main(["train-lm", "--set", "vocab_size=10", "--out", str(out), *QUIET]) == 2
    assert "come from the tokenizer" in _one_error(capsys)
    assert main(["train-lm", "--task", str(tmp_path / "missing.txt"), "--out", str(out), *QUIET]) == 2
    assert "neither a built-in corpus" in _one_error(capsys)
    assert main(["train-lm", "--vocab-size", "100", "--out", str(out), *QUIET]) == 2
    assert "--vocab-size must be at least 257" in _one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train-lm", "generate"])
def test_lm_commands_have_complete_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0 and f"adaptinf {command}" in capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_read_lm_config_names_a_hugging_face_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not an adaptinf model directory .a Hugging Face checkpoint"):
        read_lm_config(tmp_path)


# --- FLOPs ----------------------------------------------------------------------------------------------------


def test_decoder_flops_per_token_sum_to_the_sequence_and_match_the_counter():
    cfg = DecoderConfig(vocab_size=300, max_position_embeddings=48, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
    d, L = cfg.hidden_size, 20
    assert sum(flops.decoder_token(p, cfg) for p in range(L)) == flops.dense_decoder(L, cfg)
    per_block = 2 * L * d * (3 * d + d + 2 * 64) + 2 * L * (L + 1) * d  # projections, FFN, causal scores + sum
    assert flops.dense_decoder(L, cfg) == 2 * per_block + 2 * L * d * 300
    lengths = torch.tensor([L, 7])
    assert torch.equal(flops.dense_decoder(lengths, cfg), torch.tensor([flops.dense_decoder(L, cfg), flops.dense_decoder(7, cfg)]))

    from torch.utils.flop_counter import FlopCounterMode

    from adaptinf.decoder import Decoder

    model = Decoder(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(3, L, dtype=torch.long))
    # the counter sees the matmuls; CPU scaled_dot_product_attention counts 0 (torch 2.13), so add the core
    counted = counter.get_total_flops()
    attention = cfg.num_hidden_layers * flops.causal_attention_core(L, d)
    assert counted == 3 * (flops.dense_decoder(L, cfg) - attention)


def test_gpt_tiny_is_the_documented_size():
    cfg = builtin_lm_config("gpt-tiny", 4096, eos_token_id=0)
    assert BUILTIN_LMS["gpt-tiny"]["hidden_size"] == 128 and cfg.max_positions == 256 and cfg.hidden_dropout_prob == 0
    model = LanguageModel(__import__("adaptinf.decoder", fromlist=["Decoder"]).Decoder(cfg))
    assert model.num_parameters() == 1_350_400
    # per token at the full context: 4 blocks + the LM head, the head about a third
    assert model.flops_per_token() == flops.dense_decoder(256, cfg) / 256
    assert 2.8e6 < model.flops_per_token() < 3.0e6
    with pytest.raises(ValueError, match="unknown built-in language model"):
        builtin_lm_config("gpt-huge", 4096)


def test_classifier_loader_names_a_language_model(tmp_path):
    """`adaptinf.load` / predict on a language-model folder says what it is, not 'corrupt'."""
    import json

    from adaptinf.checkpoint import read_config

    (tmp_path / "config.json").write_text(json.dumps({"format": "adaptinf", "format_version": 1, "kind": "causal-lm",
                                                      "method": "dense", "method_config": {}}))
    with pytest.raises(ValueError, match="holds a language model"):
        read_config(tmp_path)
