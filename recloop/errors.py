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
