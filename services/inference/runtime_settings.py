"""Triton's TraceSetting and LogSettings mapped to what this server has: the OpenTelemetry sampling ratio and
the log level, both changeable while the process runs.

Trace settings (Triton's names; values are lists of strings): `trace_rate` N samples one new trace in N
(the sampler's ratio is 1/N), `trace_level` `OFF` stops sampling and `TIMESTAMPS` resumes it,
`trace_mode` is `opentelemetry`; `trace_count` (-1) and `log_frequency` (0) are reported and only those
values accepted; `trace_file` is not supported (spans go to the OTLP endpoint). Log settings:
`log_info`/`log_warning`/`log_error` (booleans) and `log_verbose_level` (> 0 means DEBUG) set the root
logger's level; `log_format` is `default`; `log_file` is not supported (logs go to stderr).
Settings are server-wide; a model may be named (it must exist) but cannot have its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from libs.errors import InvalidArgument
from libs.telemetry import AdjustableRatioSampler

TraceValues = dict[str, list[str]]
LogValues = dict[str, bool | int | str]

_TRACE_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode", "trace_file")
_LOG_KEYS = ("log_info", "log_warning", "log_error", "log_verbose_level", "log_format", "log_file")
_LEVELS = ("TIMESTAMPS", "TENSORS")


def _rate_of(ratio: float) -> int:
    return max(round(1 / ratio), 1) if ratio > 0 else 1


class TraceSettings:
    """The trace sampling settings; changes apply to the tracer provider's sampler at once."""

    def __init__(self, sampler: AdjustableRatioSampler | None, default_ratio: float) -> None:
        self._sampler = sampler
        self._default_rate = _rate_of(default_ratio)
        self._rate = self._default_rate
        self._on = default_ratio > 0 and sampler is not None

    def current(self) -> TraceValues:
        """The settings in effect, as Triton names them."""
        return {
            "trace_level": ["TIMESTAMPS"] if self._on else ["OFF"],
            "trace_rate": [str(self._rate)],
            "trace_count": ["-1"],
            "log_frequency": ["0"],
            "trace_mode": ["opentelemetry"],
            "trace_file": [""],
        }

    def update(self, changes: Mapping[str, Sequence[str] | None]) -> TraceValues:
        """Applies `changes` (an empty or None value resets the key to its default), returns the settings.

        Raises:
            InvalidArgument: An unknown key or a value this server cannot honour; names the key.
        """
        rate, on = self._rate, self._on
        for key, values in changes.items():
            if key not in _TRACE_KEYS:
                raise InvalidArgument(f"trace setting '{key}' is unknown; known: {list(_TRACE_KEYS)}")
            value = [str(v) for v in values] if values else []
            if key == "trace_rate":
                if not value:
                    rate = self._default_rate
                    continue
                try:
                    rate = int(value[0])
                except ValueError:
                    rate = 0
                if rate < 1 or len(value) != 1:
                    raise InvalidArgument(f"trace_rate: expected one integer >= 1, got {value}")
            elif key == "trace_level":
                if not value:
                    on = True
                elif value == ["OFF"]:
                    on = False
                elif all(v in _LEVELS for v in value):
                    on = True
                else:
                    raise InvalidArgument(f"trace_level: expected OFF, TIMESTAMPS or TENSORS, got {value}")
            elif key == "trace_count" and value not in ([], ["-1"]):
                raise InvalidArgument(f"trace_count: only -1 (no limit) is supported, got {value}")
            elif key == "log_frequency" and value not in ([], ["0"]):
                raise InvalidArgument(f"log_frequency: only 0 is supported, got {value}")
            elif key == "trace_mode" and value not in ([], ["opentelemetry"]):
                raise InvalidArgument(f"trace_mode: only opentelemetry is supported, got {value}")
            elif key == "trace_file" and value not in ([], [""]):
                raise InvalidArgument("trace_file: not supported; spans go to the OTLP endpoint")
        if on and self._sampler is None:
            on = False  # tracing is off in this process (no OTEL_EXPORTER_OTLP_ENDPOINT): nothing to sample
        self._rate, self._on = rate, on
        if self._sampler is not None:
            self._sampler.set_ratio(1 / rate if on else 0.0)
        return self.current()


class LogSettings:
    """The root logger's level seen through Triton's log settings."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger()

    def current(self) -> LogValues:
        level = self._logger.getEffectiveLevel()
        return {
            "log_file": "",
            "log_info": level <= logging.INFO,
            "log_warning": level <= logging.WARNING,
            "log_error": level <= logging.ERROR,
            "log_verbose_level": 1 if level <= logging.DEBUG else 0,
            "log_format": "default",
        }

    def update(self, changes: Mapping[str, Any]) -> LogValues:
        """Applies `changes` and returns the settings in effect.

        Raises:
            InvalidArgument: An unknown key or a value of the wrong type; names the key.
        """
        values = self.current()
        for key, value in changes.items():
            if key not in _LOG_KEYS:
                raise InvalidArgument(f"log setting '{key}' is unknown; known: {list(_LOG_KEYS)}")
            if key in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise InvalidArgument(f"{key}: expected a boolean, got {value!r}")
            elif key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidArgument(f"{key}: expected an integer >= 0, got {value!r}")
            elif key == "log_format" and value not in ("default", ""):
                raise InvalidArgument(f"log_format: only 'default' is supported, got {value!r}")
            elif key == "log_file" and value != "":
                raise InvalidArgument("log_file: not supported; logs go to stderr")
            values[key] = value
        if values["log_verbose_level"]:
            level = logging.DEBUG
        elif values["log_info"]:
            level = logging.INFO
        elif values["log_warning"]:
            level = logging.WARNING
        elif values["log_error"]:
            level = logging.ERROR
        else:
            level = logging.CRITICAL
        self._logger.setLevel(level)
        return self.current()


def trace_changes(values: Mapping[str, Any], source: str) -> dict[str, list[str] | None]:
    """Normalises trace setting values from JSON (a string, a list of strings or null) to lists.

    Raises:
        InvalidArgument: A value of another type; names `source` and the key.
    """
    out: dict[str, list[str] | None] = {}
    for key, value in values.items():
        if value is None:
            out[key] = None
        elif isinstance(value, str | int) and not isinstance(value, bool):
            out[key] = [str(value)]
        elif isinstance(value, list) and all(isinstance(v, str | int) for v in value):
            out[key] = [str(v) for v in value]
        else:
            raise InvalidArgument(f"{source} '{key}': expected a string or a list of strings, got {value!r}")
    return out
