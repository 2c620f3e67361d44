"""The one error policy: every error a user can cause or fix is a `LumosError`.

    try:
        run_step(...)
    except LumosError as e:     # the CLI prints str(e) in one line; -v adds the traceback
        ...

Subclasses name what went wrong (a config, a dataset, a checkpoint, the object store); the message
says what was wrong and what to do. Anything else escaping the library is a bug.
"""


class LumosError(Exception):
    """An error a user can cause or fix; the CLI prints its message in one line."""


# The errors several packages raise. Each also subclasses ValueError, which the library raised for
# these cases before: code that caught ValueError keeps working. Errors of one package live there
# (lumos.storage.StorageError, lumos.evaluation.gate.GateError, lumos.config.ConfigError, ...).


class NotFoundError(LumosError, FileNotFoundError):
    """Something a run needs is not where the config or the command says: a dataset, encoder
    weights, an export. The message says where it looked."""


class DatasetError(LumosError, ValueError):
    """A raw source, dataset or sample that cannot be used as it is."""


class FeaturesError(LumosError, ValueError):
    """Feature files that are missing, inconsistent or do not fit the run (re-run featurize)."""


class CheckpointError(LumosError, ValueError):
    """A checkpoint that cannot be loaded, or resumed by this run (another run's checkpoint)."""


class ModelConfigError(LumosError, ValueError):
    """A model size, override or head that does not make a valid model."""
