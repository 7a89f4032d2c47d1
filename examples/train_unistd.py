"""Train one UniSTD model jointly on several tasks.

    accelerate launch examples/train_unistd.py                       # four synthetic tasks, small random CLIP
    accelerate launch examples/train_unistd.py --config run.yaml --epochs 10
    accelerate launch --multi_gpu --num_processes 4 examples/train_unistd.py --backbone openai/clip-vit-base-patch16

Every field of `unistd_hf.training.TrainingArguments` is a flag (`--help` lists them); `--config` reads them
from a JSON or YAML file, and flags given on the command line override the file.
"""

import sys

from unistd_hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
