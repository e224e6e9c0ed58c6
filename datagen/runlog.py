"""The run's log file: standard logging from the ``datagen`` logger, secrets redacted."""

from __future__ import annotations

import logging
from pathlib import Path

from datagen.redact import redact

LOGGER_NAME = "datagen"


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RunLog:
    """Attach a file handler to the ``datagen`` logger for the length of one run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.logger = logging.getLogger(LOGGER_NAME)
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(
            RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self.handler.setLevel(logging.INFO)
        self._old_level = self.logger.level

    def __enter__(self) -> RunLog:
        self.logger.addHandler(self.handler)
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._old_level)
        self.handler.close()
