"""The error and warning types every layer raises; the command lines turn them into one line and exit code 2."""


class UsageError(ValueError):
    """Bad user input; the message names the input and the fix."""


class InputWarning(UserWarning):
    """Input that is used, but not entirely as given (a prompt cut to the encoder's length, an unsafe load);
    the scripts print these as one ``warning: ...`` line each."""


class NonFiniteError(UsageError):
    """Sampling produced NaN or infinite values (the images would be black); the message names the step where they
    first appeared. Nothing is written for the batch."""
