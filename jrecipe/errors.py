"""The one exception type for mistakes a person made (config, data, paths).

Raised anywhere in jrecipe; the entry point turns it into a one-paragraph
message and exit status 2. A traceback is reserved for bugs in jrecipe itself.
"""


class UserError(Exception):
  """A problem with the user's input: the message says what is wrong and what is valid."""

  exit_code = 2


class RunFailure(Exception):
  """A run that failed at run time for a reason that is not a bug (non-finite loss, ...): exit 1."""

  exit_code = 1
