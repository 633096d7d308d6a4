import sys

from jobs.annotate import run

sys.exit(run())
