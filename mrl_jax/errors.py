"""The one base class of errors a user can cause and fix, and the config error.

Every mistake a user can make (a bad config field, a missing dataset, a wrong
or unreadable checkpoint, bad data, bad probe settings) raises a subclass of
`UserError` whose message is one line naming what is wrong and the fix.
`mrl_jax.main` prints such an error as that one line and exits with status 2;
anything else is a bug and keeps its traceback.

Subclasses also derive from the matching builtin (ValueError,
FileNotFoundError, ...) so callers that catch those keep working.
"""


class UserError(Exception):
  """Base class: something the user can fix; the message says how, in one line."""


class ConfigError(UserError, ValueError):
  """A config field has a value the run cannot use.

  Raised before anything is compiled or any checkpoint is touched, with a message
  that names the offending field and the fix.
  """
