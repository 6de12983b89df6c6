"""The error hierarchy: InputError is a bad argument, still caught as a BackendError (and a ValueError)."""

from __future__ import annotations

import clipengine.errors as errors


def test_input_error_is_a_backend_error_and_a_value_error() -> None:
    assert issubclass(errors.InputError, errors.BackendError)
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.InputError, errors.ClipEngineError)
    assert "InputError" in errors.__all__
    assert errors.InputError.__doc__ and "BackendError" in errors.InputError.__doc__


def test_every_name_in_all_is_an_exception_class() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), Exception), name
