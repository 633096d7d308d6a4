import sys

from jobs.coco_export import run

sys.exit(run())
