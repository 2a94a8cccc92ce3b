"""Data pipeline: sources -> tokenized, packed, memmap-cached token streams -> resumable DataModule."""

from distill.data.module import DistillDataModule, PackedWindows, ResumableSampler
from distill.data.sources import HFDatasetSource, LocalFilesSource, Source, StdlibSource
from distill.data.teacher_samples import TeacherSamplesSource

__all__ = [
    "DistillDataModule",
    "HFDatasetSource",
    "LocalFilesSource",
    "PackedWindows",
    "ResumableSampler",
    "Source",
    "StdlibSource",
    "TeacherSamplesSource",
]
