"""Domain exceptions. Each message says what is wrong and where (file, line, field)."""


class RecloopError(Exception):
    """Base class for errors that the CLI reports as a one-line message (no traceback)."""


class DatasetError(RecloopError):
    """Bad input data or a dataset directory that cannot be read or written."""


class ConfigError(RecloopError):
    """A configuration key or value that is unknown or invalid."""


class RegistryError(RecloopError):
    """A model version that is unknown, partial or corrupt, or a registry operation refused."""


class ServingError(RecloopError):
    """The serving stack cannot load or run a model version (engine, index, state store)."""


class EngineParityError(ServingError):
    """An inference engine's outputs disagree with the reference torch model: refuse it."""


class IndexUnavailable(ServingError):
    """The item index cannot answer now (a vector database that went away): the request may
    succeed on another replica or later (HTTP 503), unlike a bug in the serving code."""


def undecodable(exc: UnicodeDecodeError) -> str:
    """Where and why bytes are not UTF-8, for a message: "line 3 (byte offset 17): not valid
    UTF-8 (byte 0xff: invalid start byte)"."""
    data = bytes(exc.object)
    line = data.count(b"\n", 0, exc.start) + 1
    bad = " ".join(f"0x{b:02x}" for b in data[exc.start : exc.end][:4])
    return f"line {line} (byte offset {exc.start}): not valid UTF-8 (byte {bad}: {exc.reason})"
