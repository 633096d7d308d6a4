"""A synthetic S3 endpoint for benchmarks: a bucket of N generated keys, listed and read like S3.

``images/000000000.jpg`` ... ``images/{N-1:09d}.jpg`` exist without being stored: ListObjectsV2
(prefix, start-after, continuation token, max-keys, delimiter-free) answers from arithmetic on the
key index, GET returns the same small JPEG for every key. A per-request delay stands in for S3's
latency (a 1,000-key page takes ~50-100 ms on AWS), so what parallel listing buys is measurable
without downloading anything. Runs in its own process so it does not compete with the measured
one for the GIL.
"""

from __future__ import annotations

import bisect
import http.server
import io
import multiprocessing
import time
from urllib.parse import parse_qs, quote, urlsplit

from PIL import Image

KEY_FORMAT = "images/{:09d}.jpg"


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (120, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


class _Keys:
    """The sorted key space as a sequence, so bisect finds positions in O(log N)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> str:
        return KEY_FORMAT.format(index)


def _handler(bucket: str, keys: _Keys, delay: float, body: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._reply(200, b"", "application/xml", head=True)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            path = url.path.lstrip("/")
            if path == bucket and query.get("list-type") == "2":
                time.sleep(delay)
                self._reply(200, self._list(query), "application/xml")
            elif path.startswith(f"{bucket}/images/"):
                self._reply(200, body, "image/jpeg")
            else:
                self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")

        def _list(self, query: dict) -> bytes:
            prefix = query.get("prefix", "")
            after = max(query.get("start-after", ""), query.get("continuation-token", ""))
            limit = int(query.get("max-keys", "1000"))
            start = max(bisect.bisect_left(keys, prefix), bisect.bisect_right(keys, after) if after else 0)
            end = bisect.bisect_left(keys, prefix + "\U0010ffff")
            page = [keys[i] for i in range(start, min(end, start + limit))]
            truncated = start + len(page) < end
            contents = "".join(
                f"<Contents><Key>{quote(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                f'<ETag>"0"</ETag><Size>{len(body)}</Size><StorageClass>STANDARD</StorageClass></Contents>'
                for k in page
            )
            token = f"<NextContinuationToken>{quote(page[-1])}</NextContinuationToken>" if truncated else ""
            return (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{bucket}</Name><Prefix>{quote(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
                f"<MaxKeys>{limit}</MaxKeys><EncodingType>url</EncodingType>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{contents}{token}</ListBucketResult>"
            ).encode()

        def _reply(self, status: int, payload: bytes, content_type: str, head: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not head:
                self.wfile.write(payload)

    return Handler


def _serve(bucket: str, count: int, delay: float, port: multiprocessing.Value) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(bucket, _Keys(count), delay, _jpeg()))
    port.value = server.server_address[1]
    server.serve_forever()


class SyntheticS3:
    """``with SyntheticS3("bench", 10**7, delay=0.05) as endpoint:`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, bucket: str, count: int, delay: float = 0.05) -> None:
        self.bucket, self.count, self.delay = bucket, count, delay
        self._process: multiprocessing.Process | None = None

    def __enter__(self) -> str:
        port = multiprocessing.Value("i", 0)
        self._process = multiprocessing.Process(target=_serve, args=(self.bucket, self.count, self.delay, port))
        self._process.start()
        while not port.value:
            time.sleep(0.01)
        return f"http://127.0.0.1:{port.value}"

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join()

    def key(self, index: int) -> str:
        return KEY_FORMAT.format(index)
