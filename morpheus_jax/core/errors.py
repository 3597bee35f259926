"""The error contract: one hierarchy for every error this package raises on purpose.

``UserError`` is bad input the user can fix (a config key, a file, a dataset, a
checkpoint, a flag): the ``morpheus`` command prints it as one line naming the culprit and
exits 2. Anything else that escapes (a plain ``ValueError``, ``KeyError`` …) is a bug and
keeps its traceback. Some classes also derive from the built-in exception a Python caller
would catch for the same problem (``ValueError`` for bad values, ``FileNotFoundError`` /
``FileExistsError`` for paths), so library users can keep catching those.
"""

from __future__ import annotations


class MorpheusError(Exception):
    """Base of every error raised on purpose by morpheus_jax."""


class UserError(MorpheusError):
    """Bad input the user can fix; the CLI prints it as one line and exits 2."""


class InputError(UserError, ValueError):
    """An argument or array handed to a function does not fit (shapes, names, ranges)."""


class ConfigError(InputError):
    """A config file, an override or a flag names an unknown key or holds a bad value."""


class IncompatibleCheckpoint(ConfigError):
    """Resuming or loading a checkpoint written with a different model config."""


class LadderError(ConfigError):
    """A scaling-ladder file that does not describe a set of runs."""


class DataError(InputError):
    """Raw cohort files or a prepared dataset that cannot be used."""


class PrepareError(DataError):
    """Raw cohort files that `prepare` cannot turn into a dataset (names the file and field)."""


class SourceError(DataError):
    """Public downloads (slide HDF5s, Xena matrices, GDC files and sheets, clinical tables)
    that `tcga build` cannot read as their format says (names the file and row or column)."""


class DatasetError(DataError):
    """A prepared dataset is missing, incomplete, corrupted or does not fit the model."""


class DownstreamError(InputError):
    """Downstream inputs (checkpoint, dataset, task columns, flags) that do not fit together."""


class ExportError(InputError):
    """Inputs to export / import that do not fit together (named in the message)."""


class LayoutError(ExportError):
    """A state dict or parameter dict does not fit the authors' layout for the given sizes."""


class WeightFileError(ExportError):
    """A weight file that cannot be read or written (format, dtype, suffix)."""


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm; names the step (the config, e.g. the learning rate, is the fix)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or resumed (names the step folder and the part)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The path names no MORPHEUS checkpoint."""


class ResourceError(UserError):
    """A resource ran out or would run out (disk space, memory, file handles): names the path
    or the setting and what ran out; what was written before stays."""


class OutputExists(UserError, FileExistsError):
    """An output path is taken and replacing it was not asked for."""


class MissingPath(UserError, FileNotFoundError):
    """An input path that does not exist."""


# Errors of the operating system about a path the user named (or one under it): one line, not a bug.
_PATH_ERRNOS = {"EACCES": "permission denied", "EPERM": "operation not permitted",
                "EROFS": "read-only file system (choose a writable folder)",
                "ENOTDIR": "a part of the path is a file, not a folder",
                "EISDIR": "is a folder, expected a file", "ELOOP": "too many levels of symbolic links",
                "ENAMETOOLONG": "file name too long", "EEXIST": "already exists"}


def path_problem(exc: BaseException) -> str | None:
    """One line naming the path, if ``exc`` is the operating system refusing a path (read-only
    or permission-denied folder, a file where a folder is expected, a symlink loop …); else None."""
    import errno

    if not isinstance(exc, OSError) or not exc.filename:
        return None
    why = next((text for name, text in _PATH_ERRNOS.items() if exc.errno == getattr(errno, name, None)), None)
    if why is None:
        return None
    target = f" (writing {exc.filename2})" if exc.filename2 else ""
    return f"{exc.filename}: {why}{target}"


def resource_exhausted(exc: BaseException) -> str | None:
    """What ran out, in one line naming the path where known, if ``exc`` (or what caused it)
    is a resource running out: disk space, memory or file handles. None otherwise.

    Running out is the environment's doing, not a bug: the CLI reports it like a user error
    (exit 2); what was written before stays (files are written beside and renamed)."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{where}no space left on the device (free disk space or use another folder, then rerun)"
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return f"{where}too many open files (raise `ulimit -n`, or lower data.worker_count / --workers)"
        if isinstance(exc, MemoryError):
            return "out of memory (lower the batch, the bag size or the number of workers)"
        if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and "emory" not in text):
            return f"no space left on the device ({text.splitlines()[0][:300]})"
        if "RESOURCE_EXHAUSTED" in text:
            return f"out of device memory ({text.splitlines()[0][:300]}); lower train.global_batch_size or data.num_patches"
        exc = exc.__cause__ or exc.__context__
    return None
