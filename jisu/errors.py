"""Errors jisu raises for bad input: each carries a one-line message naming the file and the problem."""


class JisuError(Exception):
    """Base class: the CLI prints `jisu: <message>` and exits 2, without a traceback."""


class ModelFormatError(JisuError):
    """A model file is truncated, corrupt, of an unknown type, or refused (pickle)."""


class UnsupportedError(JisuError):
    """An architecture, tensor type or feature jisu does not handle."""


class ModelNotFoundError(JisuError):
    """MODEL names nothing jisu can find; the message says how to get it."""


class TemplateError(JisuError):
    """A chat template failed to render or tried to escape its sandbox."""


class InputError(JisuError):
    """Text or a value from the user that jisu cannot take (a lone surrogate in a prompt, ...)."""
