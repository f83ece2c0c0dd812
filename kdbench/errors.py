"""The errors a user can cause; the CLI reports them in one line (file, key, fix) instead of a traceback."""

from kdbench.cache.store import StoreError
from kdbench.config import ConfigError
from kdbench.data.sources import DatasetError
from kdbench.teacher import CheckpointError
from kdbench.report.records import RecordError
from kdbench.train.loop import NonFiniteLossError

USER_ERRORS = (ConfigError, RecordError, DatasetError, StoreError, CheckpointError, NonFiniteLossError, FileNotFoundError)
