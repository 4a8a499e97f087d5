"""The one error type for mistakes a user makes in a config.

Raised before anything is compiled or any checkpoint is touched, with a message
that names the offending field and the fix.
"""


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""
