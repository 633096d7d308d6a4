import sys

from jobs.synthetic_shapes import run

sys.exit(run())
