"""Which exceptions mean "the input is wrong": every entry point (the `sdg` command, a replica process) shows
them as one `error:` line and exits 2, where any other exception is a bug and keeps its traceback."""
from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that are the user's to fix (imported here, lazily, so that this module imports
    nothing of the engine at load time and any module may use it)."""
    from pydantic import ValidationError

    from engine.backends.base import BackendError
    from engine.config import ConfigError
    from engine.constraints import ConstraintError
    from engine.methods import MethodError
    from engine.models import ModelError
    from engine.prompts_file import InputError
    from engine.store import StoreError
    return (BackendError, ConfigError, ConstraintError, MethodError, ModelError, InputError, StoreError,
            ValidationError)
