"""Converters from the paper's released data files to our records (``irtuning convert NAME SRC OUT``).

One module per data set; each writes the same folder layout as the built-in data (see ``common``).
"""

from irtuning_plugin.tasks.converters.argrevision import convert_argrevision
from irtuning_plugin.tasks.converters.common import ConversionError
from irtuning_plugin.tasks.converters.iterater import convert_iterater

CONVERTERS = {"iterater": convert_iterater, "argrevision": convert_argrevision}

__all__ = ["CONVERTERS", "ConversionError", "convert_argrevision", "convert_iterater"]
