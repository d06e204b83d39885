"""Media: register upload metadata (type and size policy), plan thumbnail sizes."""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field
from servicekit import create_app, env_int

MAX_BYTES = env_int("MEDIA_MAX_BYTES", 50 * 1024 * 1024)
ALLOWED = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "video/mp4": ".mp4",
    "application/pdf": ".pdf",
}


class UploadRequest(BaseModel):
    filename: str = Field(min_length=1, max_length=255)
    content_type: str
    size: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)


class Upload(UploadRequest):
    key: str


_uploads: dict[str, Upload] = {}

router = APIRouter(prefix="/uploads", tags=["media"])


@router.post("", status_code=status.HTTP_201_CREATED)
def register_upload(request: UploadRequest) -> Upload:
    """Content-addressed storage key: same bytes, same key."""
    suffix = ALLOWED.get(request.content_type)
    if suffix is None:
        raise HTTPException(status_code=415, detail=f"unsupported type {request.content_type}")
    if request.size > MAX_BYTES:
        raise HTTPException(status_code=413, detail=f"larger than {MAX_BYTES} bytes")
    if PurePosixPath(request.filename).suffix.lower() not in {suffix, ".jpeg"}:
        raise HTTPException(status_code=422, detail=f"filename must end in {suffix}")
    key = hashlib.sha256(f"{request.sha256}:{request.content_type}".encode()).hexdigest()[:20]
    upload = Upload(key=key + suffix, **request.model_dump())
    _uploads[upload.key] = upload
    return upload


@router.get("/{key}/thumbnail")
def thumbnail(key: str, width: int = Query(320, ge=16, le=1920)) -> dict[str, int | str]:
    """Size of a thumbnail ``width`` wide, keeping the aspect ratio, never upscaling."""
    upload = _uploads.get(key)
    if upload is None:
        raise HTTPException(status_code=404, detail="no such upload")
    if upload.width is None or upload.height is None:
        raise HTTPException(status_code=409, detail="not an image with known dimensions")
    scaled = min(width, upload.width)
    height = max(1, round(upload.height * scaled / upload.width))
    return {"key": key, "width": scaled, "height": height}


app = create_app("media", routers=[router])
