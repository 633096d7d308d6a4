"""storage: sorted, literal, range-split listing on a local folder and a real S3 server; exclusive create; redaction."""

from __future__ import annotations

import threading

import pytest
import s3fs

from storage import (
    KeyRange,
    create_exclusive,
    filesystem_for,
    folder_exists,
    iter_folder,
    iter_sorted,
    redact,
    replace_whole,
    split_ranges,
)

# Names that glob, URL-quote or sort in surprising ways; a folder whose name looks like an image.
ODD_NAMES = [
    "img[1].png",
    "*.jpg",
    "what?.jpg",
    "{a,b}.jpg",
    "100%.jpg",
    "#hash.jpg",
    "semi;colon.jpg",
    "with space.jpg",
    "ünïcödé.jpg",
    "日本.jpg",
    "a.jpg",
    "a/b.jpg",
    "a0.jpg",
    "x.jpg/inside.png",
    "deep/er/est.jpg",
]


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the s3_server env


def listed(uri: str, key_range: KeyRange = KeyRange(), page: int = 1000) -> list[str]:
    fs, root = filesystem_for(uri)
    return [path for chunk in iter_sorted(fs, root, key_range, page) for path, _ in chunk]


def local_tree(tmp_path) -> str:
    for name in ODD_NAMES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    return str(tmp_path)


def test_local_listing_is_sorted_literal_and_files_only(tmp_path):
    root = local_tree(tmp_path)
    paths = listed(root, page=3)
    assert paths == sorted(f"{root}/{n}" for n in ODD_NAMES)  # full-path order, as S3 lists
    assert f"{root}/x.jpg" not in paths and f"{root}/x.jpg/inside.png" in paths  # a folder is not an object
    fs, _ = filesystem_for(root)
    sizes = {path: size for chunk in iter_sorted(fs, root) for path, size in chunk}
    assert sizes[f"{root}/img[1].png"] == len(b"img[1].png")


def test_s3_listing_is_sorted_literal_paged_and_skips_folder_markers(s3_bucket):
    fs = s3()
    fs.pipe({f"{s3_bucket}/in/{name}": name.encode() for name in ODD_NAMES})
    fs.pipe({f"{s3_bucket}/in/{i:05d}.jpg": b"x" for i in range(1050)})
    fs.pipe({f"{s3_bucket}/in/marker.jpg/": b"", f"{s3_bucket}/inside-not/a.jpg": b"x"})
    paths = listed(f"s3://{s3_bucket}/in")
    expected = sorted([f"{s3_bucket}/in/{n}" for n in ODD_NAMES] + [f"{s3_bucket}/in/{i:05d}.jpg" for i in range(1050)])
    assert paths == expected  # > 1000 keys: several ListObjectsV2 pages; the sibling prefix is not included


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ranges_cover_every_key_exactly_once(tmp_path, s3_bucket, where):
    names = [f"{i:04d}.jpg" for i in range(0, 600, 3)] + ODD_NAMES
    if where == "local":
        root = local_tree(tmp_path)
        for name in names[: -len(ODD_NAMES)]:
            (tmp_path / name).write_bytes(b"x")
    else:
        s3().pipe({f"{s3_bucket}/in/{name}": b"x" for name in names})
        root = f"s3://{s3_bucket}/in"
    whole = listed(root)
    fs, path = filesystem_for(root)
    ranges = split_ranges(fs, path, 8)
    assert len(ranges) > 1
    pieces = [listed(root, r) for r in ranges]
    assert [p for piece in pieces for p in piece] == whole  # in order, disjoint, complete
    assert split_ranges(fs, path, 1) == [KeyRange()]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_prefix_under_min_keys_is_one_range_found_with_one_listing(tmp_path, s3_bucket, where):
    names = [f"{i:06d}.jpg" for i in range(1200)]  # zero padding: four levels of probes before any cut
    if where == "local":
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        fs, root = filesystem_for(str(tmp_path))
    else:
        fs = s3()
        fs.pipe({f"{s3_bucket}/in/{name}": b"x" for name in names})
        root = f"{s3_bucket}/in"
    calls = []
    if where == "s3":
        call_s3 = fs._call_s3

        async def counted(method, *args, **kwargs):  # the real request, counted
            calls.append(kwargs.get("MaxKeys"))
            return await call_s3(method, *args, **kwargs)

        fs._call_s3 = counted
    assert split_ranges(fs, root, 8, min_keys=1201) == [KeyRange()]
    assert calls == ([] if where == "local" else [1000, 1000])  # two pages, no probes
    calls.clear()
    assert len(split_ranges(fs, root, 8, min_keys=1200)) > 1  # as many keys as min_keys: cut
    assert where == "local" or len(calls) > 2  # listed a page, then probed


def test_listing_a_range_starts_and_stops_where_asked(s3_bucket, tmp_path):
    s3().pipe({f"{s3_bucket}/in/{i:03d}.jpg": b"x" for i in range(30)})
    for root, prefix in ((f"s3://{s3_bucket}/in", f"{s3_bucket}/in"), (local_tree(tmp_path), str(tmp_path))):
        if root.startswith("s3://"):
            got = listed(root, KeyRange(f"{prefix}/010.jpg", f"{prefix}/013.jpg"))
            assert got == [f"{prefix}/010.jpg", f"{prefix}/011.jpg", f"{prefix}/012.jpg"]
        else:
            got = listed(root, KeyRange(f"{prefix}/a", f"{prefix}/a0"))
            assert got == [f"{prefix}/a.jpg", f"{prefix}/a/b.jpg"]


def test_folder_listing_is_one_level_and_prefix_filtered(tmp_path, s3_bucket):
    s3().pipe(
        {
            f"{s3_bucket}/out/annotations-1.parquet": b"x",
            f"{s3_bucket}/out/other.parquet": b"x",
            f"{s3_bucket}/out/_index/annotations-2.parquet": b"x",
        }
    )
    fs, root = filesystem_for(f"s3://{s3_bucket}/out")
    assert [p for page in iter_folder(fs, root, "annotations-") for p, _ in page] == [
        f"{s3_bucket}/out/annotations-1.parquet"
    ]
    (tmp_path / "annotations-1.parquet").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "annotations-2.parquet").write_bytes(b"x")
    fs, root = filesystem_for(str(tmp_path))
    assert [p for page in iter_folder(fs, root, "annotations-") for p, _ in page] == [
        f"{tmp_path}/annotations-1.parquet"
    ]


def test_folder_exists_asks_s3_for_one_key_however_large_the_prefix(s3_bucket, tmp_path):
    fs = s3()
    fs.pipe({f"{s3_bucket}/many/{i:05d}.jpg": b"x" for i in range(1200)})  # two listing pages
    calls = []
    call_s3 = fs._call_s3

    async def counted(method, *args, **kwargs):  # the real request, counted
        calls.append((method, kwargs.get("MaxKeys")))
        return await call_s3(method, *args, **kwargs)

    fs._call_s3 = counted
    assert folder_exists(fs, f"{s3_bucket}/many") and folder_exists(fs, f"{s3_bucket}/many/")
    assert folder_exists(fs, s3_bucket)
    assert not folder_exists(fs, f"{s3_bucket}/nothing") and not folder_exists(fs, "no-such-bucket-here/x")
    assert calls == [("list_objects_v2", 1)] * 5
    calls.clear()
    assert fs.isdir(f"{s3_bucket}/many")  # what it replaces: s3fs pages through the whole prefix first
    assert len(calls) >= 2
    (tmp_path / "f.jpg").write_bytes(b"x")
    local, _ = filesystem_for(str(tmp_path))
    assert folder_exists(local, str(tmp_path)) and not folder_exists(local, str(tmp_path / "f.jpg"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exclusive_create_has_one_winner(tmp_path, s3_bucket, where):
    uri = str(tmp_path / "lease" / "1.json") if where == "local" else f"s3://{s3_bucket}/lease/1.json"
    fs, path = filesystem_for(uri)
    wins: list[bool] = []
    threads = [
        threading.Thread(target=lambda i=i: wins.append(create_exclusive(fs, path, b"%d" % i))) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert create_exclusive(fs, path, b"again") is False


def test_readers_never_see_a_document_half_written(tmp_path):
    fs, path = filesystem_for(str(tmp_path / "lease" / "00000001.json"))
    document = b'{"run_id": "' + b"x" * 4000 + b'"}'
    assert create_exclusive(fs, path, document)
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(fs.cat_file(path))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(300):
        replace_whole(fs, path, document)
        assert not create_exclusive(fs, path, b"another run")
    stop.set()
    reader.join()
    assert seen and set(seen) == {document}  # (an open-truncate-write shows readers empty files)
    assert sorted(p.name for p in (tmp_path / "lease").iterdir()) == ["00000001.json"]  # no temporaries left


def test_redaction_strips_url_secrets_only():
    assert redact("https://h.example/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=k") == "https://h.example/a.jpg"
    assert redact("https://user:pass@h.example:8443/a.jpg#x") == "https://h.example:8443/a.jpg"
    assert redact("s3://bucket/odd?name@x.jpg") == "s3://bucket/odd?name@x.jpg"  # part of an S3 key
    assert redact("/local/what?.jpg") == "/local/what?.jpg"
