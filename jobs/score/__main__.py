from jobs.cli import exit_process
from jobs.score import run

exit_process(run())
