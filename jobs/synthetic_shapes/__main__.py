from jobs.cli import exit_process
from jobs.synthetic_shapes import run

exit_process(run())
