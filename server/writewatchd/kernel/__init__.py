"""Thin ctypes bindings to the kernel interfaces writewatch stands on.

Nothing here knows about sessions or transports; errno becomes a domain exception
(:mod:`writewatchd._exceptions`) at one boundary, ``_libc.raise_errno``.
"""

from .inject import InjectionResult, inject_userfaultfd
from .pagemap import (
    ALL_CATEGORIES,
    PAGE_SIZE,
    Category,
    PagemapScanner,
    RawScan,
    ScanFlag,
    ScanResult,
)
from .pidfd import ProcessHandle, pidfd_getfd, pidfd_open
from .procfs import (
    Mapping,
    MappingPerm,
    ProcessIdentity,
    ProcessStatus,
    mm_fingerprint,
    read_maps,
    read_status,
    thread_ids,
)
from .spawn import SpawnedProcess, spawn_tracked
from .uffd import TRACKING_FEATURES, RegisterMode, UffdFeature, Userfaultfd, is_userfaultfd

__all__ = [
    "ALL_CATEGORIES",
    "PAGE_SIZE",
    "TRACKING_FEATURES",
    "Category",
    "Mapping",
    "MappingPerm",
    "PagemapScanner",
    "ProcessIdentity",
    "ProcessStatus",
    "RawScan",
    "RegisterMode",
    "ScanFlag",
    "ScanResult",
    "UffdFeature",
    "Userfaultfd",
    "is_userfaultfd",
    "mm_fingerprint",
    "ProcessHandle",
    "pidfd_getfd",
    "pidfd_open",
    "read_maps",
    "read_status",
    "thread_ids",
    "InjectionResult",
    "SpawnedProcess",
    "inject_userfaultfd",
    "spawn_tracked",
]
