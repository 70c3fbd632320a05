"""The project's error types: one clear message naming the file, the row or offset, and what to do."""


class MemBridgeError(Exception):
    """Base class of every error the project raises on purpose."""


class DataError(MemBridgeError):
    """A bad input file: unreadable video, corrupt shard record, malformed annotation row, unknown id."""


class ConfigError(MemBridgeError):
    """Contradictory or invalid flags / configuration."""


class CheckpointError(MemBridgeError):
    """A checkpoint that cannot be loaded: wrong format, wrong shapes, missing keys."""
