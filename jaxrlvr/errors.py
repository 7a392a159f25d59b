"""The error every bad setting raises, at the bottom of the import graph so that any
module (config, data, models) can raise it."""


class ConfigError(ValueError):
    """An invalid config value; the message names the key and the allowed range."""
