"""Cohort directories (shared/cohort-format.md): tables, lazily read slides, validation, packed store."""

from slidefm.cohort.reader import Cohort, H5SlideReader, SlideData, SlideReader, TaskSpec
from slidefm.cohort.pack import pack_cohort
from slidefm.cohort.store import PackedStore, StoreSlideReader
from slidefm.cohort.validate import ValidationReport, summarize, validate_cohort

__all__ = [
    "Cohort", "SlideData", "TaskSpec", "SlideReader", "H5SlideReader", "StoreSlideReader", "PackedStore",
    "pack_cohort", "validate_cohort", "ValidationReport", "summarize",
]
