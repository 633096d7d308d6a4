import sys

from jobs.finetune import run

sys.exit(run())
