from jobs.cli import exit_process
from jobs.finetune import run

exit_process(run())
