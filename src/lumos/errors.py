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
