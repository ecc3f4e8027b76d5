"""The one exception type for bad input: its message names the problem and the fix.

Entry points catch it, print one line and exit non-zero, before anything in the workdir is written.
"""


class UserError(Exception):
  """Bad input (config, flags, data, checkpoint, mesh) that the user can fix."""
