"""The error types gptspec raises; each message names what was wrong and where."""


class SpecError(ValueError):
    """A ModelSpec, or its JSON, that the spec does not allow."""


class WeightsError(ValueError):
    """A weights file or directory that cannot be read as the spec requires."""


class InputError(ValueError):
    """Tokens or targets that the model cannot take."""


class BackendError(RuntimeError):
    """A backend that is not installed, or a dtype/device it cannot run."""
