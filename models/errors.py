"""The one exception a method raises for a problem the user can fix."""


class InputError(ValueError):
    """A job cannot run with these inputs or with this deployment's weights (a wrong adapter, a
    reference that does not fit, a weight directory that is missing); the message says what to
    change. Workers report it as the job's error; anything else is an internal error."""
