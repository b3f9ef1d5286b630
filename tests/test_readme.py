"""The README's quick start runs as written: its ```bash quickstart block (with `--preset quick`
replaced by a tiny preset: the 2-layer random BERT on a few dozen samples of a small CSV) and then
its ```python quickstart block, in one scratch folder, through the installed `adaptinf` command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_blocks() -> dict[str, str]:
    blocks = dict((lang, body) for lang, body in re.findall(r"```(bash|python) quickstart\n(.*?)```", README.read_text(), re.S))
    assert set(blocks) == {"bash", "python"}, "README.md needs a ```bash quickstart and a ```python quickstart block"
    return blocks


def test_readme_quickstart_runs(tiny_hf_dir, user_csv, tmp_path):
    blocks = quickstart_blocks()
    assert "--preset quick" in blocks["bash"]
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(tiny_hf_dir), "max_length": 32,
        "data": {"name": str(user_csv), "text_column": "review", "label_column": "verdict", "max_train_samples": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3},
        "latency": {"samples": 32, "repeats": 1, "warmup": 0},
        "methods": {"ee": {"source": "pretrained"}},
    }, sort_keys=False))
    bash = blocks["bash"].replace("--preset quick", f"--preset {preset} --threads 1 --no-progress")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "preds.jsonl").read_text().count("\n") == 2
    done = subprocess.run([sys.executable, "-c", blocks["python"]], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 2
