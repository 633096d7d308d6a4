"""Reading a block of objects from an S3 server: per-object literal reads against ``fs.cat`` of a list.

    python benchmarks/bench_read.py [--objects 64] [--object-kib 160] [--repeats 7]

Starts moto's S3 server on loopback (as the tests do), uploads ``--objects`` objects of
``--object-kib`` KiB (a COCO photo is ~160 KiB) and times, on one s3fs instance:

* ``storage.read_objects``: what the annotate job runs since issue 11: one capped, ranged
  ``_cat_file`` per object (no glob expansion), a window of 16 at a time on fsspec's loop;
* ``fs.cat(list)``: what it ran before, the peer: globs the names, then a HEAD and a GET per object.

Medians of the repeats, objects per second. moto is a single Python process, so absolute figures
say more about moto than about S3; the ratio is the point.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--object-kib", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args(argv)


def median_rate(run, count: int, repeats: int) -> float:
    run()  # warm-up: connections, credentials
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def main(args: argparse.Namespace) -> None:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import fsspec

    from storage import read_objects

    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench-read")
        payload = os.urandom(args.object_kib * 1024)
        paths = [f"bench-read/{i:04d}.jpg" for i in range(args.objects)]
        fs.pipe({path: payload for path in paths})
        uris = [f"s3://{path}" for path in paths]

        def ours() -> None:
            assert all(content == payload for content in read_objects(uris))

        def peer() -> None:
            assert all(content == payload for content in fs.cat(paths, on_error="return").values())

        ours_rate = median_rate(ours, args.objects, args.repeats)
        peer_rate = median_rate(peer, args.objects, args.repeats)
        print(f"{args.objects} objects of {args.object_kib} KiB from moto on loopback; medians of {args.repeats}")
        print("| read | objects/s | vs fs.cat(list) |")
        print("|---|---|---|")
        print(f"| storage.read_objects (per object, ranged) | {ours_rate:.0f} | {ours_rate / peer_rate:.2f}x |")
        print(f"| fs.cat(list) (before) | {peer_rate:.0f} | 1.00x |")
    finally:
        server.stop()


if __name__ == "__main__":
    main(parse_args())
