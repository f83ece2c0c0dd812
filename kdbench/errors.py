"""The errors a user can cause, all derived from :class:`KdbenchError` (a leaf module: it imports nothing).

The CLI prints each as one line, ``kdbench: error: <file, key, fix>``, and exits with 2; ``kdbench --debug``
shows the traceback instead. Their messages name what to fix, so none needs a traceback. Each also derives
from the builtin it refines (``ValueError``, ``FileNotFoundError``, ...), so callers may catch either.
"""

from __future__ import annotations


class KdbenchError(Exception):
    """Base of every error a user can cause; its message names the file, the key and the fix."""


class ConfigError(KdbenchError, ValueError):
    """A user error in a config file or a ``--config`` override."""


class DatasetError(KdbenchError, FileNotFoundError):
    """A raw dataset or a data shard that is missing, truncated or corrupt."""


class DataShardError(KdbenchError, ValueError):
    """A data shard that is corrupt, truncated or changed since its manifest was written."""


class StoreError(KdbenchError, ValueError):
    """A teacher-output store that is missing, corrupt, stale or built for something else."""


class CheckpointError(KdbenchError, ValueError):
    """A teacher checkpoint that is missing, does not match its model, or is not what its config states (its
    ``sha256``, its ``expected_top1``)."""


class RecordError(KdbenchError, ValueError):
    """A run record that is not valid JSON, lacks a key, or duplicates another."""


class NonFiniteLossError(KdbenchError, FloatingPointError):
    """A loss became NaN or infinite during training."""


USER_ERRORS = (KdbenchError, FileNotFoundError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message is joined with spaces): what the CLI and the workflow
    print for a user error."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
