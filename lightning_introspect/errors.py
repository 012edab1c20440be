"""The warnings and errors a user sees from lightning_introspect (no dependencies: methods, callbacks
and loggers can all raise them)."""


class IntrospectionSkipWarning(UserWarning):
    """A callback cannot serve this model or data and is skipped for the fit (one warning, training goes on)."""


class IntrospectionFailureWarning(UserWarning):
    """A callback failed mid-fit; it is disabled for the rest of the fit and training goes on."""


class IntrospectionInputError(ValueError):
    """What the model or the data gave contradicts an explicit argument of the callback (a wrong
    ``num_classes``, ``class_names`` of the wrong length, labels out of range after ``target_transform``).

    Raised from ``IntrospectionCallback.preflight``, before the first training step, it refuses the fit
    with a message naming the argument; found later, it is a failure like any other (contained under
    ``on_error="warn"``).
    """


__all__ = ["IntrospectionFailureWarning", "IntrospectionInputError", "IntrospectionSkipWarning"]
