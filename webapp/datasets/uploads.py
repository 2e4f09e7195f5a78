from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload


class SizeLimitHandler(FileUploadHandler):
    """Stops storing an upload the moment the request's files together pass MAX_UPLOAD_BYTES,
    not after they landed. The limit is per request, not per file: otherwise one POST of many
    files each just under it would fill the disk. (The form's text fields are capped by
    Django's own DATA_UPLOAD_MAX_MEMORY_SIZE.) Django makes one handler per request."""

    def __init__(self, request=None):
        super().__init__(request)
        self.received = 0
        """Bytes of every file of this request so far."""

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > settings.MAX_UPLOAD_BYTES:
            self.request.upload_too_large = True
            raise StopUpload(connection_reset=False)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None
