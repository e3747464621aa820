"""Client of a remote CAS: find, upload and download blobs and trees.

Split by concern (as remote-apis-sdks splits its CAS client):

``connection``  stubs, batch planning, parallel requests, digest checks, errors
``upload``      FindMissingBlobs, BatchUpdateBlobs, ByteStream Write (resumed)
``download``    BatchReadBlobs, ByteStream Read, every blob verified
``tree``        GetTree with paging, hostile Directory names refused
``client``      :class:`CasClient`, the one object callers use

Every RPC goes through :meth:`Remote.call`, one retry unit per request (a
batch, a ByteStream stream, a GetTree page), so a server restart in the middle
of a large upload costs one unit again, not the whole upload.
"""

from __future__ import annotations

from pipeline.reapi.cas.client import CasClient
from pipeline.reapi.cas.connection import ENTRY_FRAMING
from pipeline.reapi.cas.download import DownloadStats
from pipeline.reapi.cas.upload import BlobSource, LocalBlobs, MemoryBlobs, UploadStats

__all__ = [
    "ENTRY_FRAMING",
    "BlobSource",
    "CasClient",
    "DownloadStats",
    "LocalBlobs",
    "MemoryBlobs",
    "UploadStats",
]
