"""Importing adaptinf (and building its CLI parser) loads neither matplotlib nor transformers."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, adaptinf, adaptinf.cli, adaptinf.recipes.finetune, adaptinf.evaluate, adaptinf.report, adaptinf.bench;"
        "adaptinf.list_methods(); adaptinf.cli.build_parser();"
        "heavy = [m for m in ('matplotlib', 'transformers', 'tokenizers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
