from jobs.cli import exit_process
from jobs.coco_export import run

exit_process(run())
