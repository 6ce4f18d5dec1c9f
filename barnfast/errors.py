"""Exceptions shared across barnfast."""


class SampleError(ValueError):
    """A training or evaluation sample that cannot be used; the message names the reason.

    The data pipeline catches it per sample, records ``(sample id, reason)`` in the run's
    skipped-samples file, and fails the run only when the skipped share passes the threshold.
    """


class ConfigError(ValueError):
    """A recipe or command-line value that is invalid; the message names the field."""
