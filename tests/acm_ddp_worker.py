"""Run by tests/test_acm.py under torchrun: phases 1 and 2 of a tiny ACM, each rank its share of
the modules; rank 0 saves the resulting weights to OUT/model.safetensors."""

import sys
from pathlib import Path

from safetensors.torch import save_file
from test_acm import distilled

if __name__ == "__main__":
    out = Path(sys.argv[1])
    model = distilled(out, workers=1)
    from adaptinf.recipes.finetune import dist_info

    if dist_info()[0] == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
