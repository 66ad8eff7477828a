"""`python -m launch.torchrun [torchrun options] -m launch.cli train ...`: torchrun for Braid's ranks.

The same arguments and agent as `python -m torch.distributed.run`, with one difference: when a rank
exited with REQUEUE_EXIT_CODE (a clean preemption: every rank saved the checkpoint together) and every
other rank that the agent counts as failed either did the same or was stopped by the agent itself
(SIGTERM, then SIGKILL: it stops the others as soon as one rank exits, often while they are exiting
with the same code), this exits with that code quietly. torchrun itself reports that case like a crash: an agent log line
per rank ("failed (exitcode: 75)"), one per rank it stops, and a ChildFailedError traceback with
a failure table, about 40 lines in front of the one line that matters. Any other failure is
reported exactly as torchrun reports it.
"""
from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

REQUEUE_EXIT_CODE = 75      # pretrain.train.REQUEUE_EXIT_CODE (not imported: the agent needs none of the trainer)
_AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
_AGENT_STOPS = (-signal.SIGTERM, -signal.SIGKILL)      # exit codes of ranks the agent stopped itself
# the agent's lines about stopping ranks: noise when all of them were preempted, the story when one crashed
_HELD_MESSAGES = ("failed (exitcode: %s)", "Sending process %s closing signal %s")


class _HoldBack(logging.Filter):
    """Keeps the agent's rank-stopping records until the run's outcome says whether to show them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_HELD_MESSAGES):
            self.held.append(record)
            return False
        return True


@record                                 # torchrun's own report of a failed run (error files of the ranks)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    agent_log = logging.getLogger(_AGENT_LOGGER)
    held = _HoldBack()
    agent_log.addFilter(held)
    try:
        run(args)
        return 0
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        if REQUEUE_EXIT_CODE in codes and all(c in (REQUEUE_EXIT_CODE, *_AGENT_STOPS) for c in codes):
            return REQUEUE_EXIT_CODE
        agent_log.removeFilter(held)
        for line in held.held:           # a real failure: the lines torchrun would have shown, then its report
            agent_log.handle(line)
        raise
    finally:
        agent_log.removeFilter(held)


if __name__ == "__main__":
    sys.exit(main())
