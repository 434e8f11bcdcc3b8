"""What reaches the console, and what only the run's ``tdlight.log``.

Hydra configures logging for every command (``conf/config.yaml``, ``hydra.job_logging``): the file
handler keeps every record with its time and logger; the console handler prints one short line per
event, ``[tdlight.decompose] ratio 46.46, …``, and drops the records marked :data:`FILE_ONLY` — those
a stage already shows on the console in its own form (a rich panel, a table) and logs only so that
``tdlight.log`` holds them too.
"""

from __future__ import annotations

import logging

# ``log.warning(msg, extra=FILE_ONLY)``: into tdlight.log, not onto the console (shown there already)
FILE_ONLY = {"file_only": True}


class ConsoleFilter(logging.Filter):
    """The console handler's filter (``hydra.job_logging.filters.console``): drops :data:`FILE_ONLY`
    records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)
