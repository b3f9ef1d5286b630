"""Run by tests/test_train.py, alone or under torchrun: fine-tune a tiny model on fixed data.

Dropout is off so that the only difference between 1 and 2 processes is how the global batch is
split. The dataset size (21, batch 4)
gives a last global batch of one sample: one rank then runs a zero-weight filler share.
"""

import sys

from test_train import tiny_data, tiny_model

from adaptinf.recipes.finetune import finetune
from adaptinf.settings import TrainConfig

if __name__ == "__main__":
    out = sys.argv[1]
    # 21 samples, batch 4: last global batch holds 1 sample, so one rank gets a filler share.
    finetune(tiny_model(dropout=0.0), tiny_data(21, 1), tiny_data(8, 2),
             TrainConfig(epochs=2, batch_size=4, lr=1e-3, save_every=100), out, progress=False)
