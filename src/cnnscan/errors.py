"""Errors cnnscan raises at its boundaries: each names the problem and the fix in one line."""


class CnnscanError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ImageError(CnnscanError, ValueError):
    """The image cannot be read or is not usable as a picture."""


class ModelError(CnnscanError, ValueError):
    """The model cannot be loaded or does not behave like a classifier."""


class LayerError(CnnscanError, KeyError):
    """A layer name does not exist or is ambiguous."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TargetError(CnnscanError, ValueError):
    """A target class is out of range or unknown."""


class MethodError(CnnscanError, ValueError):
    """A method name or option is not valid."""


class MetricError(CnnscanError, ValueError):
    """An evaluation metric cannot be computed from what it was given (map, box, mask)."""


class BatchError(CnnscanError, ValueError):
    """A batch run cannot start: bad input listing, options, or an output folder in use."""


class AuditError(CnnscanError, ValueError):
    """An audit cannot run: no batch output, an unknown method or class, too few maps."""
