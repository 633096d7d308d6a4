from jobs.annotate import run
from jobs.cli import exit_process

exit_process(run())
