"""The one error a bad recipe or override raises."""


class ConfigError(ValueError):
    """A recipe or override names an unknown key or holds a bad value."""
