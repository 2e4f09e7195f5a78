"""The two ways a job can go wrong, kept apart so the page can say the right thing."""


class UserError(Exception):
    """Something the user can fix (bad data, impossible settings, a model that cannot serve
    the task). The message is shown on the job page as is."""


class Cancelled(Exception):
    """The job was stopped on request (a cancel, or the worker lost its lease)."""
