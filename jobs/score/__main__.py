import sys

from jobs.score import run

sys.exit(run())
