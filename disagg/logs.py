"""Names of the loggers the command line treats specially."""

PROGRESS_LOGGER = "disagg.progress"
"""Start-up progress a user waits on (compiling the decode step): the CLI shows it at
INFO even under the default --log-level WARNING."""
