"""The one exception type the command line turns into a clear message and exit code 2."""


class UserError(Exception):
    """A problem the user can fix: bad input, missing weights, a locked run folder.

    The message is one paragraph that names the file involved and says what to do.
    """

    exit_code = 2
